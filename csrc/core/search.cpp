#include "search.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "thread_pool.hpp"

namespace pyneuron {

namespace {

bool is_negated(BinaryOp op) { return op == BinaryOp::AndNot || op == BinaryOp::OrNot; }

// The best `capacity` items by (score descending, order ascending): exactly the
// first `capacity` items of a stable descending sort of all offered items.
struct Candidate {
  double score;
  uint64_t order;
  int32_t parent;   // index into the previous beam
  int32_t concept;  // -1: the previous beam entry itself
  BinaryOp op;
};

class TopK {
 public:
  explicit TopK(std::size_t capacity) : capacity_(capacity) { items_.reserve(capacity + 1); }
  bool full() const { return items_.size() >= capacity_; }
  const Candidate& worst() const { return items_.back(); }
  const std::vector<Candidate>& items() const { return items_; }
  void offer(const Candidate& c) {
    if (full() && !better(c, worst())) return;
    auto pos = std::upper_bound(items_.begin(), items_.end(), c, better);
    items_.insert(pos, c);
    if (items_.size() > capacity_) items_.pop_back();
  }

 private:
  static bool better(const Candidate& a, const Candidate& b) {
    return a.score > b.score || (a.score == b.score && a.order < b.order);
  }
  std::size_t capacity_;
  std::vector<Candidate> items_;
};

struct LiveEntry {
  BeamEntry entry;
  SparseMask formula;       // F
  SparseMask intersection;  // F AND A
};

struct Counts {
  uint64_t intersection;  // |X∧A|
  uint64_t size;          // |X|
};

// Counts of X = F op C from |F|, |F∧A|, |C|, |C∧A|, |F∧C|, |F∧C∧A| (inclusion–exclusion).
Counts candidate_counts(BinaryOp op, uint64_t f, uint64_t fa, uint64_t c, uint64_t ca, uint64_t fc,
                        uint64_t fca, uint64_t a, uint64_t total) {
  switch (op) {
    case BinaryOp::Or: return {fa + ca - fca, f + c - fc};
    case BinaryOp::And: return {fca, fc};
    case BinaryOp::AndNot: return {fa - fca, f - fc};
    case BinaryOp::OrNot: return {a - ca + fca, total - c + fc};
  }
  return {0, 0};
}

// Upper bound of the IoU of X = F op C before counting F∧C: IoU = I / (|A| + E)
// with I = |X∧A| <= i_max and E = |X∧¬A| >= e_min. Rounding is monotone, so the
// bound computed in float64 is >= the candidate's float64 IoU.
double iou_bound(BinaryOp op, uint64_t f, uint64_t fa, uint64_t c, uint64_t ca, uint64_t a,
                 uint64_t total) {
  const uint64_t fe = f - fa, ce = c - ca;
  uint64_t i_max = 0, e_min = 0;
  switch (op) {
    case BinaryOp::Or: i_max = std::min(fa + ca, a); e_min = std::max(fe, ce); break;
    case BinaryOp::And: i_max = std::min(fa, ca); e_min = 0; break;
    case BinaryOp::AndNot: i_max = fa; e_min = fe > ce ? fe - ce : 0; break;
    case BinaryOp::OrNot:
      i_max = std::min(a, fa + a - ca);
      e_min = std::max(fe, total - a - ce);
      break;
  }
  return double(i_max) / (double(a + e_min) + 1e-10);
}

double length_factor(double penalty, int length) { return std::pow(penalty, double(length - 1)); }

void fill_counts(LiveEntry& live) {
  live.entry.size = live.formula.total();
  live.entry.size_images = live.formula.nonempty_images();
  live.entry.intersection = live.intersection.total();
  live.entry.intersection_images = live.intersection.nonempty_images();
}

UnitResult search_unit(const MaskSetView& units, int64_t u, const MaskSetView& concepts,
                       const std::vector<uint64_t>& concept_size, const SearchOptions& options) {
  const Grid& grid = concepts.grid;
  const uint64_t total = grid.total_pixels();
  const int64_t n_concepts = concepts.n_masks;
  const std::size_t beam_size = static_cast<std::size_t>(options.beam_size);
  const SparseMask unit = SparseMask::from_set(units, u);
  const uint64_t a = unit.total();

  UnitResult result;
  result.unit_size = a;
  result.unit_images = unit.nonempty_images();

  // Primitives: concepts present in the data with IoU > 0, by IoU then concept id.
  std::vector<uint64_t> ca(static_cast<std::size_t>(n_concepts), 0);
  TopK primitives(beam_size);
  for (int64_t c = 0; c < n_concepts; ++c) {
    if (concept_size[c] == 0) continue;
    ca[c] = unit.intersect_count(concepts, c);
    const double iou = iou_of(ca[c], concept_size[c], a);
    if (iou > 0) primitives.offer({iou, uint64_t(c), -1, int32_t(c), BinaryOp::Or});
  }
  if (primitives.items().empty()) return result;

  std::vector<LiveEntry> beam;
  for (const Candidate& p : primitives.items()) {
    SparseMask formula = SparseMask::from_set(concepts, p.concept);
    SparseMask inter = formula.combine(unit, BinaryOp::And);
    LiveEntry live{BeamEntry{}, std::move(formula), std::move(inter)};
    live.entry.concepts = {p.concept};
    live.entry.length = 1;
    live.entry.score = p.score;
    live.entry.iou = p.score;
    fill_counts(live);
    beam.push_back(std::move(live));
  }
  result.primitive = beam.front().entry.concepts.front();
  result.primitive_iou = beam.front().entry.iou;

  const uint64_t n_ops = options.ops.size();
  for (int step = 1; step < options.length; ++step) {
    TopK next(beam_size);
    for (std::size_t p = 0; p < beam.size(); ++p)
      next.offer({beam[p].entry.score, uint64_t(p), int32_t(p), -1, BinaryOp::Or});

    for (std::size_t p = 0; p < beam.size(); ++p) {
      const LiveEntry& parent = beam[p];
      const uint64_t f = parent.entry.size, fa = parent.entry.intersection;
      std::vector<double> factor(n_ops);
      for (std::size_t k = 0; k < n_ops; ++k)
        factor[k] = length_factor(options.penalty, parent.entry.length + 1 + is_negated(options.ops[k]));
      for (int64_t c = 0; c < n_concepts; ++c) {
        const uint64_t cs = concept_size[c];
        if (cs == 0) continue;
        // Candidates arrive in increasing order, so one can enter only by beating
        // the current worst score strictly; skip the concept if no operator can.
        if (next.full()) {
          bool hopeless = true;
          for (std::size_t k = 0; k < n_ops && hopeless; ++k)
            hopeless = iou_bound(options.ops[k], f, fa, cs, ca[c], a, total) * factor[k] <= next.worst().score;
          if (hopeless) {
            ++result.pruned;
            continue;
          }
        }
        ++result.counted;
        const uint64_t fc = parent.formula.intersect_count(concepts, c);
        const uint64_t fca = fc == 0 ? 0 : parent.intersection.intersect_count(concepts, c);
        for (std::size_t k = 0; k < n_ops; ++k) {
          const Counts x = candidate_counts(options.ops[k], f, fa, cs, ca[c], fc, fca, a, total);
          const double score = iou_of(x.intersection, x.size, a) * factor[k];
          const uint64_t order = beam_size + (uint64_t(p) * uint64_t(n_concepts) + uint64_t(c)) * n_ops + k;
          next.offer({score, order, int32_t(p), int32_t(c), options.ops[k]});
        }
      }
    }

    std::vector<LiveEntry> new_beam;
    for (const Candidate& cand : next.items()) {
      const LiveEntry& parent = beam[cand.parent];
      if (cand.concept < 0) {
        new_beam.push_back(parent);
        continue;
      }
      SparseMask formula = parent.formula.combine(SparseMask::from_set(concepts, cand.concept), cand.op);
      SparseMask inter = formula.combine(unit, BinaryOp::And);
      LiveEntry live{parent.entry, std::move(formula), std::move(inter)};
      live.entry.concepts.push_back(cand.concept);
      live.entry.ops.push_back(cand.op);
      live.entry.length += 1 + is_negated(cand.op);
      live.entry.score = cand.score;
      fill_counts(live);
      live.entry.iou = iou_of(live.entry.intersection, live.entry.size, a);
      new_beam.push_back(std::move(live));
    }
    beam = std::move(new_beam);
  }

  for (LiveEntry& live : beam) result.beam.push_back(std::move(live.entry));
  return result;
}

void check_same_grid(const MaskSetView& units, const MaskSetView& concepts) {
  if (!(units.grid == concepts.grid))
    throw std::invalid_argument("units and concepts are on different grids");
}

}  // namespace

std::vector<UnitResult> beam_search(const MaskSetView& units, int64_t unit_begin, int64_t unit_end,
                                    const MaskSetView& concepts, const SearchOptions& options) {
  check_same_grid(units, concepts);
  if (options.length < 1 || options.length > kMaxLength)
    throw std::invalid_argument("length must be between 1 and " + std::to_string(kMaxLength));
  if (options.beam_size < 1 || options.beam_size > kMaxBeamSize)
    throw std::invalid_argument("beam_size must be between 1 and " + std::to_string(kMaxBeamSize));
  if (options.ops.empty() && options.length > 1) throw std::invalid_argument("no operators given");
  if (!(options.penalty > 0) || !std::isfinite(options.penalty))
    throw std::invalid_argument("penalty must be a positive finite number");
  if (unit_begin < 0 || unit_end > units.n_masks || unit_begin > unit_end)
    throw std::invalid_argument("unit range out of bounds");
  std::vector<uint64_t> concept_size(static_cast<std::size_t>(concepts.n_masks), 0);
  for (int64_t c = 0; c < concepts.n_masks; ++c)
    for (int64_t e = concepts.offsets[c]; e < concepts.offsets[c + 1]; ++e) concept_size[c] += concepts.counts[e];
  std::vector<UnitResult> results(static_cast<std::size_t>(unit_end - unit_begin));
  parallel_for(unit_end - unit_begin, [&](int64_t i) {
    results[i] = search_unit(units, unit_begin + i, concepts, concept_size, options);
  });
  return results;
}

void intersection_counts(const MaskSetView& units, int64_t unit_begin, int64_t unit_end,
                         const MaskSetView& concepts, int64_t* out) {
  check_same_grid(units, concepts);
  if (unit_begin < 0 || unit_end > units.n_masks || unit_begin > unit_end)
    throw std::invalid_argument("unit range out of bounds");
  parallel_for(unit_end - unit_begin, [&](int64_t i) {
    const SparseMask unit = SparseMask::from_set(units, unit_begin + i);
    for (int64_t c = 0; c < concepts.n_masks; ++c)
      out[i * concepts.n_masks + c] = static_cast<int64_t>(unit.intersect_count(concepts, c));
  });
}

SparseMask evaluate(const std::vector<int32_t>& program, const MaskSetView& concepts) {
  std::vector<SparseMask> stack;
  for (const int32_t code : program) {
    if (code >= 0) {
      if (code >= concepts.n_masks) throw std::invalid_argument("formula refers to concept id " + std::to_string(code) + " beyond the store");
      stack.push_back(SparseMask::from_set(concepts, code));
      continue;
    }
    if (code == kProgramNot) {
      if (stack.empty()) throw std::invalid_argument("malformed formula program");
      stack.back() = stack.back().complement();
      continue;
    }
    if (code != kProgramAnd && code != kProgramOr) throw std::invalid_argument("unknown formula op code");
    if (stack.size() < 2) throw std::invalid_argument("malformed formula program");
    SparseMask right = std::move(stack.back());
    stack.pop_back();
    stack.back() = stack.back().combine(right, code == kProgramAnd ? BinaryOp::And : BinaryOp::Or);
  }
  if (stack.size() != 1) throw std::invalid_argument("malformed formula program");
  return std::move(stack.back());
}

void formula_counts(const SparseMask& formula, const MaskSetView& units, uint64_t* intersection,
                    uint64_t* intersection_images) {
  if (!(formula.grid() == units.grid)) throw std::invalid_argument("formula and units are on different grids");
  parallel_for(units.n_masks, [&](int64_t u) {
    intersection[u] = formula.intersect_count(units, u, &intersection_images[u]);
  });
}

}  // namespace pyneuron
