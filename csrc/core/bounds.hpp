// Exact counting algebra of the search: the counts of a candidate X = F op C by
// inclusion–exclusion, intervals of |F AND C| carried along the beam, and upper bounds
// of a candidate's IoU from what is known before counting.
#pragma once
#include <algorithm>
#include <cstdint>
#include <limits>

#include "sparse_mask.hpp"

namespace pyneuron {

inline bool is_negated(BinaryOp op) { return op == BinaryOp::AndNot || op == BinaryOp::OrNot; }

struct Counts {
  uint64_t intersection;  // |X AND A|
  uint64_t size;          // |X|
};

// Counts of X = F op C from |F|, |F∧A|, |C|, |C∧A|, |F∧C|, |F∧C∧A|.
inline Counts candidate_counts(BinaryOp op, uint64_t f, uint64_t fa, uint64_t c, uint64_t ca, uint64_t fc,
                               uint64_t fca, uint64_t a, uint64_t total) {
  switch (op) {
    case BinaryOp::Or: return {fa + ca - fca, f + c - fc};
    case BinaryOp::And: return {fca, fc};
    case BinaryOp::AndNot: return {fa - fca, f - fc};
    case BinaryOp::OrNot: return {a - ca + fca, total - c + fc};
  }
  return {0, 0};
}

// A closed interval of counts known to hold a count (lo == hi: known exactly).
struct Interval {
  int64_t lo;
  int64_t hi;
  bool exact() const { return lo == hi; }
};

// What is known of |F∧C| before counting it from |F| and |C| alone.
inline Interval overlap_interval(int64_t f, int64_t c, int64_t total) {
  return {std::max<int64_t>(0, f + c - total), std::min(f, c)};
}

// |F' AND C| for F' = F op C' from x = |F∧C| in [x.lo, x.hi], y = |C'∧C| in [y.lo, y.hi],
// z = |F∧C'| (exact), the sizes f = |F|, c = |C|, cp = |C'| and f_new = |F'|. With
// t = |F∧C'∧C|: t <= min(x, y, z), and t >= x + y - c, z + y - cp, x + z - f (two subsets
// of one set). F'∧C is then x + y - t (OR), t (AND), x - t (AND NOT) or c - y + t (OR NOT).
inline Interval derive_overlap(BinaryOp op, Interval x, Interval y, int64_t z, int64_t f, int64_t c, int64_t cp,
                               int64_t f_new) {
  const int64_t t_hi = std::min({x.hi, y.hi, z});
  const int64_t t_lo = std::max({int64_t(0), x.lo + y.lo - c, z + y.lo - cp, x.lo + z - f});
  Interval out{0, 0};
  switch (op) {
    case BinaryOp::Or: out = {std::max({x.lo, y.lo, x.lo + y.lo - t_hi}), x.hi + y.hi - t_lo}; break;
    case BinaryOp::And: out = {t_lo, t_hi}; break;
    case BinaryOp::AndNot: out = {x.lo - t_hi, std::min(x.hi - t_lo, c - y.lo)}; break;
    case BinaryOp::OrNot: out = {c - y.hi + t_lo, c - y.lo + t_hi}; break;
  }
  return {std::max<int64_t>(out.lo, 0), std::min({out.hi, c, f_new})};
}

// What is known of fca = |F∧C∧A| (given `fca`) once also limited by |F∧A|, |C∧A|, |A|,
// |F∧C| in `fc` and the parts of F and C outside A (fce = |F∧C| - fca <= min of them).
inline Interval inside_overlap(int64_t f, int64_t fa, int64_t c, int64_t ca, int64_t a, Interval fca, Interval fc) {
  return {std::max({fca.lo, fa + ca - a, fc.lo - std::min(f - fa, c - ca)}), std::min({fca.hi, fa, ca, fc.hi})};
}

// What is known of I = |X∧A| and E = |X∧¬A| for X = F op C from what is known of
// fca = |F∧C∧A| and of |F∧C| in `fc` (each an interval, exact once counted). fca and
// fce = |F∧C| - fca are also limited by the parts of F and C inside and outside A; I
// follows fca and E follows fce. The candidate's IoU is I / (|A| + E).
struct CountRange {
  int64_t i_lo, i_hi;  // |X AND A|
  int64_t e_lo, e_hi;  // |X AND NOT A|
};
inline CountRange count_range(BinaryOp op, int64_t f, int64_t fa, int64_t c, int64_t ca, int64_t a, int64_t total,
                              Interval fca, Interval fc) {
  const int64_t fe = f - fa, ce = c - ca;
  fca = inside_overlap(f, fa, c, ca, a, fca, fc);
  const int64_t fce_lo = std::max({int64_t(0), fe + ce - (total - a), fc.lo - fca.hi});
  const int64_t fce_hi = std::max(fce_lo, std::min({fe, ce, fc.hi - fca.lo}));
  CountRange r{0, 0, 0, 0};
  switch (op) {
    case BinaryOp::Or: r = {fa + ca - fca.hi, fa + ca - fca.lo, fe + ce - fce_hi, fe + ce - fce_lo}; break;
    case BinaryOp::And: r = {fca.lo, fca.hi, fce_lo, fce_hi}; break;
    case BinaryOp::AndNot: r = {fa - fca.hi, fa - fca.lo, fe - fce_hi, fe - fce_lo}; break;
    case BinaryOp::OrNot:
      r = {a - ca + fca.lo, a - ca + fca.hi, total - a - ce + fce_lo, total - a - ce + fce_hi};
      break;
  }
  return {std::max<int64_t>(r.i_lo, 0), std::max<int64_t>(r.i_hi, 0), std::max<int64_t>(r.e_lo, 0),
          std::max<int64_t>(r.e_hi, 0)};
}

// Float64 IoU of integer counts, as iou_of computes it from |X∧A| = i and |X∧¬A| = e.
inline double iou_of_parts(int64_t i, int64_t e, int64_t a) {
  return double(uint64_t(i)) / (double(uint64_t(a + e)) + 1e-10);
}

// Range of the candidate's float64 IoU: lo <= its IoU <= hi (rounding is monotone);
// lo == hi when both counts are exact.
struct IouRange {
  double lo;
  double hi;
};
inline IouRange iou_range(const CountRange& r, int64_t a) {
  return {iou_of_parts(r.i_lo, r.e_hi, a), iou_of_parts(r.i_hi, r.e_lo, a)};
}

// Whether the float64 score (i / (d + 1e-10)) * factor of integer counts i, d is surely
// below `threshold`, decided without dividing: a margin of 1e-12 covers every rounding
// of both sides (a few ulp), so "true" is exact and "false" may only be inconclusive.
inline bool surely_below(uint64_t i, uint64_t d, double factor, double threshold) {
  return double(i) * factor < threshold * double(d) * (1 - 1e-12);
}

// fca before counting: no more than what the other bounds allow.
constexpr Interval kUnknown{0, std::numeric_limits<int64_t>::max()};

}  // namespace pyneuron
