// Exact compositional beam search (compexp semantics, see DESIGN.md) and the
// counting primitives behind IoU tables and formula scores.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "mask_set.hpp"
#include "sparse_mask.hpp"

namespace pyneuron {

// Largest accepted length and beam_size (memory and time grow with both).
constexpr int kMaxLength = 32;
constexpr int kMaxBeamSize = 1024;

struct SearchOptions {
  int length = 3;
  int beam_size = 5;
  std::vector<BinaryOp> ops{BinaryOp::Or, BinaryOp::And, BinaryOp::AndNot};
  double penalty = 1.0;
  // Units are searched together in blocks whose beams take about this many bytes.
  std::size_t block_bytes = std::size_t(128) << 20;
};

// A left-deep formula concepts[0] ops[0] concepts[1] ops[1] ... with its counts
// against one unit mask A.
struct BeamEntry {
  std::vector<int32_t> concepts;
  std::vector<BinaryOp> ops;  // concepts.size() - 1 operators
  int length = 0;             // leaves plus NOTs
  double score = 0.0;
  double iou = 0.0;
  uint64_t intersection = 0;         // |F AND A|
  uint64_t size = 0;                 // |F|
  uint64_t intersection_images = 0;  // images where F AND A is not empty
  uint64_t size_images = 0;          // images where F is not empty
};

struct UnitResult {
  std::vector<BeamEntry> beam;  // best first; empty when no concept overlaps the unit
  uint64_t unit_size = 0;       // |A|
  uint64_t unit_images = 0;     // images where A is not empty
  int32_t primitive = -1;       // best single concept, -1 if none
  double primitive_iou = 0.0;
  // Every (formula, concept) pair of an expansion step is one of:
  uint64_t derived = 0;  // scored without counting |F∧C| (known from the co-occurrence table)
  uint64_t pruned = 0;   // excluded by the bounds before |F∧C| was counted
  uint64_t counted = 0;  // scored after counting |F∧C|
  uint64_t words = 0;           // 64-bit word pairs AND-popcounted for this unit
};

// Where a search spent its counting (for benchmarks: the achieved AND+popcount rate).
struct SearchStats {
  double count_seconds = 0;  // wall time inside the batched counting passes
  uint64_t count_words = 0;  // 64-bit word pairs AND-popcounted in them
};

// IoU as everywhere in pyneuron: |F∧A| / (|F| + |A| - |F∧A| + 1e-10).
inline double iou_of(uint64_t intersection, uint64_t size, uint64_t unit_size) {
  return double(intersection) / (double(size + unit_size - intersection) + 1e-10);
}

// Beam search for units [unit_begin, unit_end): units in blocks, each expansion step of a
// block counted in one batched pass over the concepts (batch_count.hpp), parallel over
// concept ranges and units.
// `cooccurrence` (optional) is concept_cooccurrence's table for `concepts`: with it the
// overlap of every beam formula with every concept is known or tightly bounded, and
// most counting is skipped. Results are the same with or without it.
std::vector<UnitResult> beam_search(const MaskSetView& units, int64_t unit_begin, int64_t unit_end,
                                    const MaskSetView& concepts, const SearchOptions& options,
                                    const uint64_t* cooccurrence = nullptr, SearchStats* stats = nullptr);

// out[c * n_concepts + d] = |concept c AND concept d| (n_concepts x n_concepts, symmetric).
// The search derives bounds of |F AND C| for every beam formula F from it.
void concept_cooccurrence(const MaskSetView& concepts, uint64_t* out, SearchStats* stats = nullptr);

// out[u * n_concepts + c] = |unit u AND concept c| for units [unit_begin, unit_end).
void intersection_counts(const MaskSetView& units, int64_t unit_begin, int64_t unit_end,
                         const MaskSetView& concepts, int64_t* out);

// Postfix formula program: code >= 0 is a concept leaf, then the operators below.
constexpr int32_t kProgramNot = -1;
constexpr int32_t kProgramAnd = -2;
constexpr int32_t kProgramOr = -3;
SparseMask evaluate(const std::vector<int32_t>& program, const MaskSetView& concepts);

// Per unit u: |F∧A_u| and the number of images where it is not empty.
void formula_counts(const SparseMask& formula, const MaskSetView& units, uint64_t* intersection,
                    uint64_t* intersection_images);

}  // namespace pyneuron
