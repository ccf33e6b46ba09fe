// Exact branch and bound for the formula of maximum IoU (see optimal.hpp).
//
// Notation: A is the unit mask, a = |A|, N the number of pixels; for a set X,
// I(X) = |X∧A| and E(X) = |X∖A|, so IoU(X) = I / (a + E) (+1e-10 as everywhere).
// A formula is a sequence c1 op1 c2 op2 ... of "present" concepts (size > 0), read
// left-deep. The search is a depth-first walk over prefixes; a node is a prefix W
// with exact counts (I_W, E_W). Every bound below is an upper bound on the IoU of
// the formulas it covers, computed as double(i_max) / (double(a + e_min) + 1e-10)
// with integers i_max >= I and e_min <= E: rounding is monotone, so the bound is >=
// the float64 IoU of every formula covered (or, where it is a sum of two ratios, it
// is nudged up by a relative 1e-12, far above the rounding error of one addition).
//
// Bounds (all admissible, i.e. never below what they cover):
// * One step, whole set (last_step): any Y = P op d with I(P) <= Im, E(P) >= Em.
//   OR: I(Y) <= min(a, Im + I(d)), E(Y) >= max(Em, E(d)); the concepts are sorted by
//   E(d): those with E(d) <= Em give (Im + max I(d)) / (a + Em), the others at most
//   Im / (a + Em) + I(d) / (a + E(d)) (suffix maximum of the second term).
//   AND: Y ⊆ P and Y ⊆ d, so I <= min(Im, max_d I(d)), E >= 0.
//   AND NOT: I <= Im, E >= Em - max_d E(d).  OR NOT: I <= a, E >= max(Em, N-a-max E(d)).
// * k steps, whole set (reach): after k-1 further steps I <= min(a, Im + sum of the
//   k-1 largest I(d)) when OR is allowed (an OR adds at most the A-pixels of one
//   concept; a repeated concept adds nothing), a when OR NOT is, else Im; E >= 0 when
//   AND or AND NOT is allowed, else Em (OR and OR NOT only grow the set). The last step
//   is then bounded by last_step; last_step is monotone (non-decreasing in Im,
//   non-increasing in Em), so the bound covers every formula of 1..k steps; the state
//   itself is covered by the max with its own ratio.
// * Pairwise (span): for W = Z op c and any concept d, |W∧d| restricted to A (or to
//   ¬A) lies in [lo, hi] computed from the exact counts of Z∧d (Z's row), c∧d (the
//   concept pair tables), W, Z, c and d by inclusion–exclusion, e.g. for W = Z ∪ c,
//   W∧d = (Z∧d) ∪ (c∧d) so max(|Z∧d|,|c∧d|) <= |W∧d| <= |Z∧d| + |c∧d|. The counts of
//   Y = W op d follow from |W∧d| exactly (OR: I(W)+I(d)-I(W∧d), AND: I(W∧d), AND NOT:
//   I(W)-I(W∧d), OR NOT: a-I(d)+I(W∧d), the same for E with N-a), so [lo, hi] gives
//   i_max and e_min for Y; reach() then covers Y's extensions.
//
// Pruning that removes formulas without a bound, each only where an equal-mask formula
// with a smaller tie key stays in the space (so the best key is never removed):
// * a step dominated by its left operand (an OR that adds no pixel of A, an AND that
//   removes no pixel outside A; unchanged masks included): see expand().
// * the first pair of a symmetric operator (OR, AND) with c2 < c1: c1 op c2 is c2 op c1.
// * (without OR NOT) the extensions of a node with I(W) = 0: every operator is monotone
//   in its left operand, so Y(W) ⊇ Y(∅) with the same intersection with A, and Y(∅) is
//   a shorter formula of the space (∅ OR d = d) or empty.
// A subtree is cut when its bound b < best IoU, or b == best IoU and the incumbent has
// at most as many concepts as the subtree's root (everything in it is longer).
#include "optimal.hpp"

#include <time.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>

#include "popcount.hpp"
#include "thread_pool.hpp"

namespace pyneuron {

namespace {

// The unit's own time in seconds: the CPU time of the thread searching it (a unit runs
// on one thread), so other work on a loaded machine does not use up its budget.
double own_seconds() {
#ifdef CLOCK_THREAD_CPUTIME_ID
  timespec now;
  if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &now) == 0) return double(now.tv_sec) + 1e-9 * double(now.tv_nsec);
#endif
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Concepts present in the data, a per-image index and the pair counts |c∧d|.
struct StoreTables {
  std::vector<int32_t> ids;     // store ids, ascending
  std::vector<int32_t> index;   // store id -> present index, -1 if absent
  std::vector<uint64_t> size;   // |c|
  std::vector<std::vector<std::pair<int32_t, int64_t>>> by_image;  // image -> (present index, entry)
  std::vector<uint64_t> owned;  // the co-occurrence table when the caller has none
  const uint64_t* pair = nullptr;  // concept_cooccurrence's table, store ids
  int64_t n_masks = 0;
  int32_t n = 0;
  uint64_t at(int32_t p, int32_t q) const {
    return pair[std::size_t(ids[p]) * std::size_t(n_masks) + std::size_t(ids[q])];
  }
};

StoreTables build_tables(const MaskSetView& concepts, const uint64_t* cooccurrence) {
  StoreTables t;
  t.n_masks = concepts.n_masks;
  if (cooccurrence == nullptr) {
    t.owned.resize(std::size_t(concepts.n_masks) * std::size_t(concepts.n_masks));
    concept_cooccurrence(concepts, t.owned.data());
    cooccurrence = t.owned.data();
  }
  t.pair = cooccurrence;
  t.index.assign(static_cast<std::size_t>(concepts.n_masks), -1);
  for (int64_t m = 0; m < concepts.n_masks; ++m) {
    const uint64_t s = cooccurrence[std::size_t(m) * std::size_t(concepts.n_masks) + std::size_t(m)];
    if (s == 0) continue;
    t.index[m] = static_cast<int32_t>(t.ids.size());
    t.ids.push_back(static_cast<int32_t>(m));
    t.size.push_back(s);
  }
  t.n = static_cast<int32_t>(t.ids.size());
  t.by_image.resize(concepts.grid.n_images);
  for (int32_t p = 0; p < t.n; ++p)
    for (int64_t e = concepts.offsets[t.ids[p]]; e < concepts.offsets[t.ids[p] + 1]; ++e)
      t.by_image[concepts.images[e]].emplace_back(p, e);
  return t;
}

struct Span {
  int64_t lo, hi;
};

// Bounds on |W∧d| within one region (A or ¬A, of size region) for W = Z op c, from
// the exact measures of Z, c, W, d, Z∧d and c∧d (see the header comment).
Span span_of(BinaryOp op, int64_t z, int64_t c, int64_t w, int64_t d, int64_t zd, int64_t cd, int64_t region) {
  int64_t lo = std::max<int64_t>(0, w + d - region), hi = std::min(w, d);
  switch (op) {
    case BinaryOp::Or:  // (Z∧d) ∪ (c∧d)
      lo = std::max({lo, zd, cd});
      hi = std::min(hi, zd + cd);
      break;
    case BinaryOp::And:  // Z∧c∧d
      hi = std::min({hi, zd, cd});
      lo = std::max({lo, zd + cd - d, w + zd - z, w + cd - c});
      break;
    case BinaryOp::AndNot:  // (Z∧d) ∖ c
      hi = std::min({hi, zd, d - cd});
      lo = std::max({lo, zd - cd, w + zd - z});
      break;
    case BinaryOp::OrNot:  // (Z∧d) ∪ (d∖c)
      lo = std::max({lo, zd, d - cd});
      hi = std::min(hi, zd + d - cd);
      break;
  }
  return {lo, std::max(lo, hi)};
}

bool symmetric(BinaryOp op) { return op == BinaryOp::Or || op == BinaryOp::And; }

// OR and OR NOT only grow the left operand; AND and AND NOT only shrink it.
bool grows(BinaryOp op) { return op == BinaryOp::Or || op == BinaryOp::OrNot; }

// A candidate formula in tie order: concepts (present indices, ascending = store id
// order) and operators (indices into options.ops).
struct Key {
  std::vector<int32_t> c;
  std::vector<int32_t> op;
};

// Lexicographic order of c1 op1 c2 op2 ... for keys of equal length.
bool lex_less(const Key& x, const Key& y) {
  if (x.c[0] != y.c[0]) return x.c[0] < y.c[0];
  for (std::size_t j = 0; j < x.op.size(); ++j) {
    if (x.op[j] != y.op[j]) return x.op[j] < y.op[j];
    if (x.c[j + 1] != y.c[j + 1]) return x.c[j + 1] < y.c[j + 1];
  }
  return false;
}

struct Node {
  int depth = 0;
  Key key;
  uint64_t i = 0, e = 0;                    // I(W), E(W)
  std::optional<SparseMask> mask, mask_a;  // W and W∧A once materialized
  std::vector<uint64_t> row_size, row_i;   // |W∧d|, |W∧A∧d| (depth >= 2, once expanded)
};

struct Child {
  double bound;
  int32_t op, d;
  uint64_t i, e;
};

class UnitSearch {
 public:
  UnitSearch(const StoreTables& tables, const MaskSetView& concepts, const MaskSetView& units, int64_t u,
             const OptimalOptions& options)
      : t_(tables), concepts_(concepts), opt_(options), unit_(SparseMask::from_set(units, u)) {
    a_ = unit_.total();
    total_ = concepts.grid.total_pixels();
    for (BinaryOp op : opt_.ops) {
      has_or_ |= op == BinaryOp::Or;
      has_shrink_ |= op == BinaryOp::And || op == BinaryOp::AndNot;
      has_ornot_ |= op == BinaryOp::OrNot;
    }
  }

  OptimalResult run(const UnitResult& beam) {
    const double start = own_seconds();
    deadline_ = limited_time() ? start + opt_.time_limit : std::numeric_limits<double>::infinity();
    OptimalResult result;
    result.unit_size = a_;
    result.unit_images = unit_.nonempty_images();
    result.primitive = beam.primitive;
    result.primitive_iou = beam.primitive_iou;
    if (a_ > 0 && t_.n > 0) {
      unit_tables();
      if (!beam.beam.empty()) seed(beam.beam.front());
      if (aborted_) open_bound_ = 1.0;  // the budget ran out in the tables: nothing is bounded
      else search_root();
    }
    result.optimal = !aborted_;
    // No IoU exceeds 1 (I <= a); the bounds' upward nudges may.
    result.upper_bound = aborted_ ? std::min(1.0, std::max(best_iou_, open_bound_)) : best_iou_;
    result.nodes = nodes_;
    if (!best_.c.empty()) result.best = materialize_best();
    result.seconds = own_seconds() - start;
    return result;
  }

 private:
  // ---- per-unit tables ---------------------------------------------------------------
  void unit_tables() {
    const int32_t n = t_.n;
    ci_.assign(n, 0);
    ce_.assign(n, 0);
    aidx_.assign(n, -1);
    const std::size_t w = concepts_.grid.words_per_image;
    const uint64_t last = concepts_.grid.last_word_mask();
    // Per image of the unit: concept AND unit bits of every concept there.
    struct Piece {
      int32_t p;
      std::size_t offset;
    };
    std::vector<std::vector<Piece>> pieces(concepts_.grid.n_images);
    std::vector<uint64_t> bits;
    std::vector<uint64_t> unit_bits(w);
    // Per image of the unit: the words where it (and so every piece) has set bits, [first, last).
    std::vector<std::pair<uint32_t, uint32_t>> spans(concepts_.grid.n_images);
    for (std::size_t at = 0; at < unit_.images().size(); ++at) {
      if (out_of_time()) return;  // run() leaves the search out
      const uint32_t image = unit_.images()[at];
      const int32_t slot = unit_.slot_at(at);
      if (slot == SparseMask::kFull) {
        std::fill(unit_bits.begin(), unit_bits.end(), ~uint64_t(0));
        unit_bits[w - 1] = last;
      } else {
        std::copy(unit_.bitset(slot), unit_.bitset(slot) + w, unit_bits.begin());
      }
      uint32_t first = 0, end = uint32_t(w);
      while (unit_bits[first] == 0) ++first;  // an image of the unit is never empty
      while (unit_bits[end - 1] == 0) --end;
      spans[image] = {first, end};
      for (const auto& [p, e] : t_.by_image[image]) {
        const std::size_t offset = bits.size();
        if (concepts_.slots[e] == kFullSlot) {
          bits.insert(bits.end(), unit_bits.begin(), unit_bits.end());
        } else {
          const uint64_t* cb = concepts_.bitset(concepts_.slots[e]);
          for (std::size_t k = 0; k < w; ++k) bits.push_back(cb[k] & unit_bits[k]);
        }
        const uint64_t count = popcount_words(bits.data() + offset, w);
        if (count == 0) {
          bits.resize(offset);
          continue;
        }
        ci_[p] += count;
        pieces[image].push_back({p, offset});
      }
    }
    int32_t k = 0;
    for (int32_t p = 0; p < n; ++p) {
      ce_[p] = t_.size[p] - ci_[p];
      if (ci_[p] > 0) aidx_[p] = k++;
    }
    k_ = k;
    pair_i_.assign(std::size_t(k) * std::size_t(k), 0);
    // Per image, every pair of its pieces with the tiled pass's micro-kernel, over the
    // unit's words there: the pieces as rows, and transposed as columns.
    const TileCountFn tile = tile_count_kernel();
    std::vector<const uint64_t*> rows;
    std::vector<std::size_t> row_at, column_at;
    std::vector<uint64_t> columns, counts;
    for (std::size_t image = 0; image < pieces.size(); ++image) {
      const std::vector<Piece>& list = pieces[image];
      if (list.empty()) continue;
      if (out_of_time()) return;
      const std::size_t m = list.size(), stride = (m + kTileStride - 1) / kTileStride * kTileStride;
      const auto [first, end] = spans[image];
      rows.clear();
      row_at.clear();
      column_at.clear();
      columns.resize(std::size_t(end - first) * stride);
      for (std::size_t x = 0; x < m; ++x) {
        const uint64_t* piece = bits.data() + list[x].offset;
        rows.push_back(piece + first);
        row_at.push_back(x);
        column_at.push_back(x * m);
        for (uint32_t word = first; word < end; ++word) columns[std::size_t(word - first) * stride + x] = piece[word];
      }
      counts.assign(m * m, 0);
      tile(rows.data(), row_at.data(), m, columns.data(), stride, column_at.data(), m, end - first, counts.data());
      for (std::size_t x = 0; x < m; ++x)
        for (std::size_t y = x; y < m; ++y) {
          const uint64_t c = counts[y * m + x];
          const int32_t px = aidx_[list[x].p], py = aidx_[list[y].p];
          pair_i_[std::size_t(px) * k + py] += c;
          if (px != py) pair_i_[std::size_t(py) * k + px] += c;
        }
    }

    // Whole-set structures for last_step / reach.
    max_i_ = *std::max_element(ci_.begin(), ci_.end());
    max_e_ = *std::max_element(ce_.begin(), ce_.end());
    std::vector<uint64_t> sorted_i(ci_);
    std::sort(sorted_i.begin(), sorted_i.end(), std::greater<>());
    top_i_.assign(std::size_t(opt_.length) + 1, 0);
    for (int j = 1; j <= opt_.length; ++j)
      top_i_[j] = top_i_[j - 1] + (std::size_t(j - 1) < sorted_i.size() ? sorted_i[j - 1] : 0);
    std::vector<int32_t> order(n);
    for (int32_t p = 0; p < n; ++p) order[p] = p;
    std::sort(order.begin(), order.end(), [&](int32_t x, int32_t y) { return ce_[x] < ce_[y]; });
    by_e_.resize(n);
    prefix_i_.resize(n);
    suffix_ratio_.assign(std::size_t(n) + 1, 0.0);
    for (int32_t j = 0; j < n; ++j) {
      by_e_[j] = ce_[order[j]];
      prefix_i_[j] = std::max(j > 0 ? prefix_i_[j - 1] : 0, ci_[order[j]]);
    }
    for (int32_t j = n - 1; j >= 0; --j)
      suffix_ratio_[j] = std::max(suffix_ratio_[j + 1], ratio(ci_[order[j]], ce_[order[j]]));
    by_e_desc_.assign(order.rbegin(), order.rend());
    by_i_desc_ = order;
    std::stable_sort(by_i_desc_.begin(), by_i_desc_.end(), [&](int32_t x, int32_t y) { return ci_[x] > ci_[y]; });
  }

  uint64_t pair_i(int32_t p, int32_t q) const {
    const int32_t x = aidx_[p], y = aidx_[q];
    return x < 0 || y < 0 ? 0 : pair_i_[std::size_t(x) * k_ + y];
  }

  // |X∧d∧A| and |X∧d| for every d, contiguous.
  struct RowRef {
    const uint64_t* i;
    const uint64_t* size;
  };

  // The row of concept p (built on first use).
  RowRef concept_row(int32_t p) {
    if (concept_rows_.empty()) concept_rows_.resize(t_.n);
    std::vector<uint64_t>& row = concept_rows_[p];
    if (row.empty()) {
      row.resize(std::size_t(t_.n));
      for (int32_t d = 0; d < t_.n; ++d) row[d] = pair_i(p, d);
    }
    if (pair_rows_.empty()) pair_rows_.resize(t_.n);
    std::vector<uint64_t>& sizes = pair_rows_[p];
    if (sizes.empty()) {
      sizes.resize(std::size_t(t_.n));
      for (int32_t d = 0; d < t_.n; ++d) sizes[d] = t_.at(p, d);
    }
    return {row.data(), sizes.data()};
  }

  RowRef row_ref(const Node& x) {
    if (x.depth == 1) return concept_row(x.key.c[0]);
    return {x.row_i.data(), x.row_size.data()};
  }

  // ---- bounds ------------------------------------------------------------------------
  double ratio(uint64_t i, uint64_t e) const { return double(i) / (double(a_ + e) + 1e-10); }

  double last_step(uint64_t im, uint64_t em) const {
    double best = 0.0;
    for (BinaryOp op : opt_.ops) {
      double b = 0.0;
      switch (op) {
        case BinaryOp::Or: {
          const std::size_t j = std::upper_bound(by_e_.begin(), by_e_.end(), em) - by_e_.begin();
          if (j > 0) b = ratio(std::min(a_, im + prefix_i_[j - 1]), em);
          if (j < by_e_.size()) b = std::max(b, (ratio(im, em) + suffix_ratio_[j]) * (1.0 + 1e-12));
          break;
        }
        case BinaryOp::And: b = ratio(std::min(im, max_i_), 0); break;
        case BinaryOp::AndNot: b = ratio(im, em > max_e_ ? em - max_e_ : 0); break;
        case BinaryOp::OrNot: b = ratio(a_, std::max(em, total_ - a_ - max_e_)); break;
      }
      best = std::max(best, b);
    }
    return best;
  }

  // Bound on the state (Im, Em) and on everything reachable from it in <= k steps.
  double reach(uint64_t im, uint64_t em, int k) const {
    const double here = ratio(im, em);
    if (k <= 0) return here;
    uint64_t i = im, e = em;
    if (has_ornot_) i = a_;
    else if (has_or_) i = std::min(a_, im + top_i_[k - 1]);
    if (has_shrink_) e = 0;
    return std::max(here, last_step(i, e));
  }

  // Bounds (i_max, e_min) for Y = W op d given spans of |W∧d| on A and on ¬A.
  void y_bounds(BinaryOp op, const Node& w, int32_t d, Span si, Span se, uint64_t& im, uint64_t& em) const {
    const int64_t wi = int64_t(w.i), we = int64_t(w.e), di = int64_t(ci_[d]), de = int64_t(ce_[d]);
    const int64_t na = int64_t(total_ - a_), a = int64_t(a_);
    int64_t i = 0, e = 0;
    switch (op) {
      case BinaryOp::Or: i = wi + di - si.lo; e = we + de - se.hi; break;
      case BinaryOp::And: i = si.hi; e = se.lo; break;
      case BinaryOp::AndNot: i = wi - si.lo; e = we - se.hi; break;
      case BinaryOp::OrNot: i = a - di + si.hi; e = na - de + se.lo; break;
    }
    im = uint64_t(std::clamp<int64_t>(i, 0, a));
    em = uint64_t(std::max<int64_t>(e, 0));
  }

  // Spans of |W∧d| on A and ¬A: exact from W's row when known (own = true), else
  // from its parent Z's row and its last concept c's row.
  static void spans(const Node& w, const Node* parent, bool own, RowRef wr, RowRef zr, RowRef cr, BinaryOp op,
                    int32_t d, int64_t a, int64_t na, int64_t c_i, int64_t c_e, int64_t d_i, int64_t d_e, Span& si,
                    Span& se) {
    if (own) {
      si = {int64_t(wr.i[d]), int64_t(wr.i[d])};
      const int64_t e = int64_t(wr.size[d] - wr.i[d]);
      se = {e, e};
      return;
    }
    const int64_t zi = int64_t(zr.i[d]), ze = int64_t(zr.size[d]) - zi;
    const int64_t ci = int64_t(cr.i[d]), ce = int64_t(cr.size[d]) - ci;
    si = span_of(op, int64_t(parent->i), c_i, int64_t(w.i), d_i, zi, ci, a);
    se = span_of(op, int64_t(parent->e), c_e, int64_t(w.e), d_e, ze, ce, na);
  }

  // Exact counts of W op d from |W∧d∧A| = wdi and |W∧d∖A| = wde.
  void child_counts(BinaryOp op, const Node& w, int32_t d, uint64_t wdi, uint64_t wde, uint64_t& i,
                    uint64_t& e) const {
    switch (op) {
      case BinaryOp::Or: i = w.i + ci_[d] - wdi; e = w.e + ce_[d] - wde; break;
      case BinaryOp::And: i = wdi; e = wde; break;
      case BinaryOp::AndNot: i = w.i - wdi; e = w.e - wde; break;
      case BinaryOp::OrNot: i = a_ - ci_[d] + wdi; e = (total_ - a_) - ce_[d] + wde; break;
    }
  }

  // ---- incumbent ---------------------------------------------------------------------
  bool cut(double bound, int depth) const {
    return bound < best_iou_ || (bound == best_iou_ && int(best_.c.size()) <= depth);
  }

  // Whether formula `key` with IoU `iou` beats the incumbent.
  bool beats(double iou, const Key& key) const {
    if (iou != best_iou_) return iou > best_iou_;
    if (iou <= 0) return false;
    if (key.c.size() != best_.c.size()) return key.c.size() < best_.c.size();
    return lex_less(key, best_);
  }

  void offer(double iou, const Key& key) {
    if (beats(iou, key)) {
      best_iou_ = iou;
      best_ = key;
    }
  }

  // Whether a listed candidate W op d (last step) can no longer beat the incumbent.
  bool bound_cut(const Child& cand, const Node& w) const {
    return cand.bound < best_iou_ || (cand.bound == best_iou_ && !beats(cand.bound, extend(w.key, cand.op, cand.d)));
  }

  void seed(const BeamEntry& entry) {
    Key key;
    for (int32_t c : entry.concepts) key.c.push_back(t_.index[c]);
    for (BinaryOp op : entry.ops)
      key.op.push_back(int32_t(std::find(opt_.ops.begin(), opt_.ops.end(), op) - opt_.ops.begin()));
    best_iou_ = entry.iou;
    best_ = std::move(key);
  }

  static Key extend(const Key& key, int32_t op, int32_t d) {
    Key out = key;
    out.op.push_back(op);
    out.c.push_back(d);
    return out;
  }

  // Whether the unit's budget of nodes or time is spent (then aborted_ is set): checked
  // before every node is expanded.
  bool out_of_budget() {
    if (opt_.max_nodes > 0 && nodes_ >= opt_.max_nodes) aborted_ = true;
    return out_of_time();
  }
  // Whether its time is spent (then aborted_ is set): checked also inside every phase that
  // can take long, the unit tables image by image and a node's rows and exact counts
  // every kTimeStride concepts, so the limit is overshot by one such step at most.
  bool out_of_time() {
    if (!aborted_ && limited_time() && own_seconds() >= deadline_) aborted_ = true;
    return aborted_;
  }
  static constexpr int32_t kTimeStride = 16;

  // A limit above a million seconds (or none) is no limit.
  bool limited_time() const { return opt_.time_limit > 0 && opt_.time_limit < 1e6; }

  // ---- search ------------------------------------------------------------------------
  void search_root() {
    const int32_t n = t_.n;
    std::vector<Child> roots;
    for (int32_t p = 0; p < n; ++p) {
      offer(ratio(ci_[p], ce_[p]), Key{{p}, {}});
      if (opt_.length > 1 && (has_ornot_ || ci_[p] > 0))
        roots.push_back({reach(ci_[p], ce_[p], opt_.length - 1), -1, p, ci_[p], ce_[p]});
    }
    walk(roots, nullptr, 0, opt_.length - 1);
  }

  // Visit children (sorted here) of `parent` (nullptr: the root) at depth + 1.
  void walk(std::vector<Child>& children, Node* parent, int depth, int remaining) {
    std::sort(children.begin(), children.end(), [](const Child& x, const Child& y) {
      if (x.bound != y.bound) return x.bound > y.bound;
      return x.op != y.op ? x.op < y.op : x.d < y.d;
    });
    for (const Child& ch : children) {
      if (cut(ch.bound, depth + 1)) continue;
      Node node;
      node.depth = depth + 1;
      node.key = parent == nullptr ? Key{{ch.d}, {}} : extend(parent->key, ch.op, ch.d);
      node.i = ch.i;
      node.e = ch.e;
      if (!out_of_budget()) expand(node, parent, remaining);
      if (aborted_) {
        open_bound_ = std::max(open_bound_, ch.bound);
        return;
      }
    }
  }

  void materialize(Node& w, Node* parent) {
    if (w.mask) return;
    if (w.depth == 1) {
      w.mask = SparseMask::view_of(concepts_, t_.ids[w.key.c[0]]);
    } else {
      materialize(*parent, nullptr);  // a parent at depth >= 2 is already materialized
      const BinaryOp op = opt_.ops[w.key.op.back()];
      w.mask = parent->mask->combine(concepts_, t_.ids[w.key.c.back()], op);
    }
    w.mask_a = w.mask->combine(unit_, BinaryOp::And);
  }

  void count_with(const Node& w, int32_t d, uint64_t& wdi, uint64_t& wde) const {
    const uint64_t size = w.mask->intersect_count(concepts_, t_.ids[d]);
    wdi = ci_[d] == 0 || w.i == 0 ? 0 : w.mask_a->intersect_count(concepts_, t_.ids[d]);
    wde = size - wdi;
  }

  // Node w (counts known, `remaining` >= 1 steps left): bound its extensions by the
  // pairwise spans, then count them exactly.
  //
  // Besides the bounds, an extension Y = W op d is dropped when it is dominated by W
  // itself: an OR / OR NOT step that adds no pixel of A (Y ⊇ W, I(Y) = I(W)) or an
  // AND / AND NOT step that removes no pixel outside A (Y ⊆ W, E(Y) = E(W)). Formulas
  // are evaluated pixel by pixel and every operator is monotone in its left operand, so
  // any continuation of Y agrees with the same continuation of W on A (first case) or
  // outside A (second case) and is a superset (subset) of it: its IoU is at most that of
  // the shorter formula without the step, which stays in the space.
  void expand(Node& w, Node* parent, int remaining) {
    ++nodes_;
    const int32_t n = t_.n;
    const int k = w.depth;
    const int32_t n_ops = int32_t(opt_.ops.size());
    const bool own = w.depth == 1;
    const RowRef wr = own ? row_ref(w) : RowRef{nullptr, nullptr};
    const RowRef zr = own ? RowRef{nullptr, nullptr} : row_ref(*parent);
    const int32_t c = w.key.c.back();
    const RowRef cr = own ? RowRef{nullptr, nullptr} : concept_row(c);
    const BinaryOp last_op = own ? BinaryOp::Or : opt_.ops[w.key.op.back()];
    const int64_t a = int64_t(a_), na = int64_t(total_ - a_);
    // Candidate extensions (op, d) that neither a bound nor dominance excludes.
    std::vector<Child> cands;
    auto consider = [&](int32_t d, int32_t j) {
      const BinaryOp op = opt_.ops[j];
      if (k == 1 && symmetric(op) && d < w.key.c[0]) return;
      Span si, se;
      spans(w, parent, own, wr, zr, cr, last_op, d, a, na, int64_t(ci_[c]), int64_t(ce_[c]), int64_t(ci_[d]),
            int64_t(ce_[d]), si, se);
      uint64_t im, em;
      y_bounds(op, w, d, si, se, im, em);
      if (grows(op) ? im <= w.i : em >= w.e) return;  // dominated by W
      // b covers Y = W op d and its extensions; on a tie only a key below the
      // incumbent's can win, and Y's extensions are longer than Y.
      const double b = reach(im, em, remaining - 1);
      const Child cand{b, j, d, 0, 0};
      if (!bound_cut(cand, w)) cands.push_back(cand);
    };
    if (remaining > 1 || best_iou_ <= 0) {
      for (int32_t d = 0; d < n; ++d)
        for (int32_t j = 0; j < n_ops; ++j) consider(d, j);
    } else {
      // Last step: only concepts that could reach the incumbent by the whole-set bound
      // of Y = W op d. OR: IoU <= (I(W) + I(d)) / (a + E(W)); AND: <= I(d) / a; AND NOT:
      // <= I(W) / (a + E(W) - E(d)). Thresholds are loosened by a relative 1e-9 and one
      // pixel, so rounding never drops a candidate; the exact bound follows.
      // When many concepts pass, they are marked first (reading only their own counts)
      // and bounded in concept order, so the pair rows are read front to back instead
      // of at random; when few pass, they are bounded as listed.
      const double t = best_iou_ * (1.0 - 1e-9);
      auto each_passing = [&](auto&& fn) {
        for (int32_t j = 0; j < n_ops; ++j) {
          const BinaryOp op = opt_.ops[j];
          if (op == BinaryOp::OrNot) {
            for (int32_t d = 0; d < n; ++d) fn(d, j);
            continue;
          }
          const bool by_i = op != BinaryOp::AndNot;
          const std::vector<int32_t>& order = by_i ? by_i_desc_ : by_e_desc_;
          const double need = op == BinaryOp::Or    ? t * double(a_ + w.e) - double(w.i)
                              : op == BinaryOp::And ? t * double(a_)
                                                    : double(a_ + w.e) - double(w.i) / t;
          for (const int32_t d : order) {
            const double value = double(by_i ? ci_[d] : ce_[d]);
            if (value <= 0 || value < need - 1.0) break;
            fn(d, j);
          }
        }
      };
      if (listed_.size() != std::size_t(n)) listed_.assign(std::size_t(n), 0);
      std::size_t passing = 0;
      each_passing([&](int32_t d, int32_t j) {
        listed_[d] |= uint8_t(1u << j);
        ++passing;
      });
      if (passing * 8 < std::size_t(n)) {
        each_passing([&](int32_t d, int32_t j) {
          listed_[d] = 0;
          consider(d, j);
        });
      } else {
        for (int32_t d = 0; d < n; ++d) {
          if (listed_[d] == 0) continue;
          for (int32_t j = 0; j < n_ops; ++j)
            if (listed_[d] >> j & 1u) consider(d, j);
          listed_[d] = 0;
        }
      }
      // Best bound first: counting stops short of the candidates that the incumbent, as it
      // improves, cuts.
      std::sort(cands.begin(), cands.end(), [](const Child& x, const Child& y) {
        if (x.bound != y.bound) return x.bound > y.bound;
        return x.d != y.d ? x.d < y.d : x.op < y.op;
      });
    }
    if (cands.empty()) return;
    if (!own) {
      materialize(w, parent);
      if (remaining > 1) {
        w.row_size.resize(n);
        w.row_i.resize(n);
        for (int32_t d = 0; d < n; ++d) {
          if (d % kTimeStride == 0 && out_of_time()) return;  // walk() records the bound
          uint64_t wdi, wde;
          count_with(w, d, wdi, wde);
          w.row_i[d] = wdi;
          w.row_size[d] = wdi + wde;
        }
      }
    }
    const bool rows = own || remaining > 1;
    const RowRef full = rows ? row_ref(w) : RowRef{nullptr, nullptr};
    std::vector<Child> children;
    // A concept's counts with W, counted once whatever the operators that need it.
    if (counted_at_.size() != std::size_t(n)) counted_at_.assign(std::size_t(n), {0, 0, 0});
    const uint64_t stamp = nodes_;
    std::size_t listed = 0;
    for (const Child& cand : cands) {
      if (listed++ % kTimeStride == 0 && out_of_time()) return;
      uint64_t wdi = 0, wde = 0;
      if (rows) {
        wdi = full.i[cand.d];
        wde = full.size[cand.d] - wdi;
      } else {
        if (bound_cut(cand, w)) continue;  // the incumbent improved since it was listed
        Counted& known = counted_at_[std::size_t(cand.d)];
        if (known.stamp != stamp) {
          count_with(w, cand.d, wdi, wde);
          known = {stamp, wdi, wde};
        }
        wdi = known.wdi;
        wde = known.wde;
      }
      const BinaryOp op = opt_.ops[cand.op];
      uint64_t i, e;
      child_counts(op, w, cand.d, wdi, wde, i, e);
      if (grows(op) ? i == w.i : e == w.e) continue;  // dominated by W (incl. unchanged masks)
      offer(ratio(i, e), extend(w.key, cand.op, cand.d));
      if (remaining > 1 && (has_ornot_ || i > 0))
        children.push_back({reach(i, e, remaining - 1), cand.op, cand.d, i, e});
    }
    if (remaining > 1) walk(children, &w, k, remaining - 1);
  }

  BeamEntry materialize_best() const {
    BeamEntry entry;
    SparseMask mask = SparseMask::view_of(concepts_, t_.ids[best_.c[0]]);
    entry.concepts.push_back(t_.ids[best_.c[0]]);
    int negations = 0;
    for (std::size_t j = 0; j < best_.op.size(); ++j) {
      const BinaryOp op = opt_.ops[best_.op[j]];
      mask = mask.combine(concepts_, t_.ids[best_.c[j + 1]], op);
      entry.ops.push_back(op);
      entry.concepts.push_back(t_.ids[best_.c[j + 1]]);
      negations += op == BinaryOp::AndNot || op == BinaryOp::OrNot;
    }
    entry.length = int(best_.c.size()) + negations;
    entry.size = mask.total();
    entry.size_images = mask.nonempty_images();
    const SparseMask hit = mask.combine(unit_, BinaryOp::And);
    entry.intersection = hit.total();
    entry.intersection_images = hit.nonempty_images();
    entry.iou = iou_of(entry.intersection, entry.size, a_);
    entry.score = entry.iou;
    return entry;
  }

  const StoreTables& t_;
  const MaskSetView& concepts_;
  const OptimalOptions& opt_;
  SparseMask unit_;
  uint64_t a_ = 0, total_ = 0;
  bool has_or_ = false, has_shrink_ = false, has_ornot_ = false;
  std::vector<uint64_t> ci_, ce_;
  std::vector<int32_t> aidx_;
  int32_t k_ = 0;
  std::vector<uint64_t> pair_i_;
  std::vector<std::vector<uint64_t>> concept_rows_, pair_rows_;  // by present index
  uint64_t max_i_ = 0, max_e_ = 0;
  std::vector<uint64_t> top_i_, by_e_, prefix_i_;
  std::vector<double> suffix_ratio_;
  std::vector<int32_t> by_i_desc_, by_e_desc_;  // present concepts by I(d), by E(d), descending
  // Last step: per concept, the operators the whole-set thresholds let through (bit j:
  // operator j; all zero between nodes).
  std::vector<uint8_t> listed_;
  double deadline_ = 0.0;  // own_seconds() at which the budget is spent
  double best_iou_ = 0.0;
  Key best_;
  uint64_t nodes_ = 0;
  struct Counted {
    uint64_t stamp;  // the node (nodes_ when it was expanded) these counts are of
    uint64_t wdi, wde;
  };
  std::vector<Counted> counted_at_;  // by present index, last step
  bool aborted_ = false;
  double open_bound_ = 0.0;
};

}  // namespace

std::vector<OptimalResult> optimal_search(const MaskSetView& units, int64_t unit_begin, int64_t unit_end,
                                          const MaskSetView& concepts, const OptimalOptions& options,
                                          const uint64_t* cooccurrence) {
  if (!(options.time_limit >= 0) || !std::isfinite(options.time_limit))
    throw std::invalid_argument("time_limit must be a finite number >= 0");
  SearchOptions beam_options;
  beam_options.length = options.length;
  beam_options.beam_size = options.beam_size;
  beam_options.ops = options.ops;
  // Validates units, ranges, length, operators and beam size.
  const StoreTables tables = build_tables(concepts, cooccurrence);
  const std::vector<UnitResult> beams =
      beam_search(units, unit_begin, unit_end, concepts, beam_options, tables.pair);
  std::vector<OptimalResult> results(beams.size());
  parallel_for(unit_end - unit_begin, [&](int64_t i) {
    UnitSearch search(tables, concepts, units, unit_begin + i, options);
    results[i] = search.run(beams[i]);
  });
  return results;
}

}  // namespace pyneuron
