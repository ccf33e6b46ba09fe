// Guaranteed-optimal compositional explanations: exact branch and bound over every
// left-deep formula of at most `length` concepts (the space the beam explores).
#pragma once
#include <cstdint>
#include <vector>

#include "mask_set.hpp"
#include "search.hpp"
#include "sparse_mask.hpp"

namespace pyneuron {

struct OptimalOptions {
  int length = 3;
  std::vector<BinaryOp> ops{BinaryOp::Or, BinaryOp::And, BinaryOp::AndNot};
  int beam_size = 5;         // beam run first; its answer is the initial lower bound
  double time_limit = 0.0;   // seconds of the unit's own (thread CPU) time; <= 0: none
  uint64_t max_nodes = 0;    // expanded nodes per unit; 0: none
};

struct OptimalResult {
  BeamEntry best;               // concepts empty when no formula has IoU > 0
  bool optimal = false;         // true: no formula of the space has a better key
  double upper_bound = 0.0;     // no formula of the space has a higher IoU
  uint64_t nodes = 0;           // formulas whose extensions were examined
  double seconds = 0.0;         // this unit's own time: the CPU time of its thread
  uint64_t unit_size = 0;
  uint64_t unit_images = 0;
  int32_t primitive = -1;
  double primitive_iou = 0.0;
};

// For each unit of [unit_begin, unit_end): the formula of maximum IoU over every
// left-deep formula of at most options.length concepts present in the data, with
// the operators given (concepts may repeat). Ties: the shorter formula, then the
// smaller concept ids read left to right, then the operator given first.
// Parallel over units. `cooccurrence` is concept_cooccurrence's table for `concepts`
// (computed here when null).
std::vector<OptimalResult> optimal_search(const MaskSetView& units, int64_t unit_begin, int64_t unit_end,
                                          const MaskSetView& concepts, const OptimalOptions& options,
                                          const uint64_t* cooccurrence = nullptr);

}  // namespace pyneuron
