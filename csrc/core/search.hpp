// Exact compositional beam search (compexp semantics, see DESIGN.md) and the
// counting primitives behind IoU tables and formula scores.
#pragma once
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
  uint64_t pruned = 0;          // (formula, concept) pairs skipped by the bound
  uint64_t counted = 0;         // (formula, concept) pairs counted
};

// IoU as everywhere in pyneuron: |F∧A| / (|F| + |A| - |F∧A| + 1e-10).
inline double iou_of(uint64_t intersection, uint64_t size, uint64_t unit_size) {
  return double(intersection) / (double(size + unit_size - intersection) + 1e-10);
}

// Beam search for units [unit_begin, unit_end), parallel over units.
std::vector<UnitResult> beam_search(const MaskSetView& units, int64_t unit_begin, int64_t unit_end,
                                    const MaskSetView& concepts, const SearchOptions& options);

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
