#include "search.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <functional>
#include <iterator>
#include <limits>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>

#include "batch_count.hpp"
#include "bounds.hpp"
#include "popcount.hpp"
#include "thread_pool.hpp"

namespace pyneuron {

namespace {

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
  SparseMask formula;              // F
  SparseMask intersection;         // F AND A
  // |F AND C| for every concept C (exact once counted); empty for a single concept with
  // the co-occurrence table: read from the table's row (SearchContext::overlap).
  std::vector<Interval> overlaps;
};

double length_factor(double penalty, int length) { return std::pow(penalty, double(length - 1)); }

void fill_counts(LiveEntry& live) {
  live.entry.size = live.formula.total();
  live.entry.size_images = live.formula.nonempty_images();
  live.entry.intersection = live.intersection.total();
  live.entry.intersection_images = live.intersection.nonempty_images();
}

// What the search shares between units.
struct SearchContext {
  const MaskSetView& concepts;
  const ImageMajorIndex& index;
  const std::vector<uint64_t>& concept_size;
  const SearchOptions& options;
  uint64_t total;
  const uint64_t* cooccurrence;  // |C AND C'|, n_concepts x n_concepts, or null
  SearchStats* stats;            // or null
  // Concepts present in the data by id, and by size then id; whether the operators are
  // among OR, AND and AND NOT (the first screen then sets quiet concepts aside).
  const std::vector<int32_t>& by_id;
  const std::vector<int32_t>& by_size;
  bool quiet_ops;

  // Whether |F AND concept c| is known to be 0.
  bool disjoint(const LiveEntry& live, std::size_t c) const {
    const Interval x = overlap(live, c);
    return x.lo == 0 && x.hi == 0;
  }
  // Whether concept c (present) is quiet for the beam entry: known to be disjoint from F
  // and from the unit (ca: |C AND A|).
  bool quiet(const LiveEntry& live, std::size_t c, uint64_t ca) const { return ca == 0 && disjoint(live, c); }
  // The concepts present in the data and not known to be disjoint from F, ascending (out
  // is overwritten).
  void overlapping(const LiveEntry& live, std::vector<int32_t>& out) const {
    const std::size_t n = concept_size.size();
    out.resize(n);
    std::size_t k = 0;
    if (live.overlaps.empty() && cooccurrence != nullptr) {
      const uint64_t* row = cooccurrence + std::size_t(live.entry.concepts[0]) * n;
      for (std::size_t c = 0; c < n; ++c) {
        out[k] = int32_t(c);
        k += row[c] != 0;
      }
    } else {
      for (std::size_t c = 0; c < n; ++c) {
        out[k] = int32_t(c);
        k += concept_size[c] != 0 && !disjoint(live, c);
      }
    }
    out.resize(k);
  }

  // A batched counting pass, timed into the stats.
  BatchCounts count(const PairCounter& counter, const PairSet* pairs) const {
    const auto start = std::chrono::steady_clock::now();
    BatchCounts counted = counter.count(pairs);
    if (stats != nullptr) {
      stats->count_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      for (const uint64_t w : counted.words) stats->count_words += w;
    }
    return counted;
  }

  // |F AND concept c| as known for a beam entry.
  Interval overlap(const LiveEntry& live, std::size_t c) const {
    return live.overlaps.empty() ? concept_overlap(std::size_t(live.entry.concepts[0]), c) : live.overlaps[c];
  }
  // The entry's overlaps, stored (to be made exact by counting).
  void store_overlaps(LiveEntry& live) const {
    if (!live.overlaps.empty()) return;
    std::vector<Interval> stored(concept_size.size());
    for (std::size_t c = 0; c < stored.size(); ++c) stored[c] = overlap(live, c);
    live.overlaps = std::move(stored);
  }

  // |concept c AND concept d|: exact from the table, else what the sizes allow.
  Interval concept_overlap(std::size_t c, std::size_t d) const {
    if (cooccurrence != nullptr) {
      const int64_t y = int64_t(cooccurrence[c * concept_size.size() + d]);
      return {y, y};
    }
    return overlap_interval(int64_t(concept_size[c]), int64_t(concept_size[d]), int64_t(total));
  }
};

// Beam entry of a single concept.
LiveEntry primitive_entry(const SearchContext& ctx, const SparseMask& unit, int32_t concept, double iou) {
  SparseMask formula = SparseMask::view_of(ctx.concepts, concept);
  SparseMask inter = formula.combine(unit, BinaryOp::And);
  // Overlaps with the other concepts: the table's row, else stored (steps only).
  std::vector<Interval> overlaps(ctx.options.length > 1 && ctx.cooccurrence == nullptr ? ctx.concept_size.size() : 0);
  for (std::size_t c = 0; c < overlaps.size(); ++c) overlaps[c] = ctx.concept_overlap(concept, c);
  LiveEntry live{BeamEntry{}, std::move(formula), std::move(inter), std::move(overlaps)};
  live.entry.concepts = {concept};
  live.entry.length = 1;
  live.entry.score = iou;
  live.entry.iou = iou;
  fill_counts(live);
  return live;
}

// Beam entry parent op concept; the parent's overlap with that concept must be exact.
// A final entry (last step) gets its counts only, without masks or intervals.
LiveEntry extended_entry(const SearchContext& ctx, const LiveEntry& parent, const SparseMask& unit,
                         const Candidate& cand, bool final) {
  LiveEntry live{parent.entry, SparseMask(), SparseMask(), {}};
  live.entry.concepts.push_back(cand.concept);
  live.entry.ops.push_back(cand.op);
  live.entry.length += 1 + is_negated(cand.op);
  live.entry.score = cand.score;
  if (final) {
    const CombinedCounts n = parent.formula.combined_counts(ctx.concepts, cand.concept, cand.op, unit);
    live.entry.size = n.total;
    live.entry.size_images = n.images;
    live.entry.intersection = n.with_total;
    live.entry.intersection_images = n.with_images;
  } else {
    live.formula = parent.formula.combine(ctx.concepts, cand.concept, cand.op);
    live.intersection = live.formula.combine(unit, BinaryOp::And);
    fill_counts(live);
    const std::size_t n = ctx.concept_size.size();
    const int64_t z = ctx.overlap(parent, cand.concept).lo, f = int64_t(parent.entry.size);
    const int64_t cp = int64_t(ctx.concept_size[cand.concept]), f_new = int64_t(live.entry.size);
    live.overlaps.resize(n);
    for (std::size_t c = 0; c < n; ++c)
      live.overlaps[c] = derive_overlap(cand.op, ctx.overlap(parent, c), ctx.concept_overlap(cand.concept, c), z, f,
                                        int64_t(ctx.concept_size[c]), cp, f_new);
  }
  live.entry.iou = iou_of(live.entry.intersection, live.entry.size, unit.total());
  return live;
}

// One unit during the search.
struct UnitSearch {
  SparseMask unit;
  UnitResult result;
  std::vector<uint64_t> ca;          // |C AND A| per concept
  std::vector<int32_t> touching;     // the concepts with |C AND A| > 0, ascending
  std::vector<LiveEntry> beam;
  // The last step kept the beam as it was: every later step would too (same beam, same
  // candidates, same order), so the unit is done.
  bool settled = false;
};

// The new beams of a block from its units' top-k candidates (`final`: of the last step).
void advance_block(const SearchContext& ctx, std::vector<UnitSearch*>& block, const std::vector<TopK>& next,
                   bool final) {
  parallel_for(int64_t(block.size()), [&](int64_t b) {
    UnitSearch& s = *block[b];
    // Extensions first, while their parents are intact; then the kept entries move over.
    const std::vector<Candidate>& items = next[b].items();
    std::vector<std::optional<LiveEntry>> beam(items.size());
    for (std::size_t j = 0; j < items.size(); ++j)
      if (items[j].concept >= 0) beam[j] = extended_entry(ctx, s.beam[items[j].parent], s.unit, items[j], final);
    for (std::size_t j = 0; j < items.size(); ++j)
      if (items[j].concept < 0) beam[j] = std::move(s.beam[items[j].parent]);
    s.beam.clear();
    for (std::optional<LiveEntry>& live : beam) s.beam.push_back(std::move(*live));
    s.settled = std::all_of(items.begin(), items.end(), [](const Candidate& c) { return c.concept < 0; });
  });
}

// A (beam entry F, concept C) pair of an expansion step still in question, and what is
// known of |F∧C∧A|.
struct Pending {
  int32_t parent;
  int32_t concept;
  Interval fca;
  double upper;  // best upper end of its candidates' scores
};
// Per unit of a block: its pairs still in question.
using Stage = std::vector<std::vector<Pending>>;

// What the stages of one expansion step of a block share: the units' top-k candidates
// (the kept beam entries offered first) and the score factors of the extensions.
struct BlockStep {
  BlockStep(const SearchContext& context, std::vector<UnitSearch*>& units) : ctx(context), block(units) {
    const std::size_t nb = block.size(), n_ops = ctx.options.ops.size();
    first_row.assign(nb + 1, 0);
    for (std::size_t b = 0; b < nb; ++b) first_row[b + 1] = first_row[b] + int64_t(block[b]->beam.size());
    next.assign(nb, TopK(std::size_t(ctx.options.beam_size)));
    factor.resize(nb);
    for (std::size_t b = 0; b < nb; ++b) {
      const UnitSearch& s = *block[b];
      for (std::size_t p = 0; p < s.beam.size(); ++p) {
        next[b].offer({s.beam[p].entry.score, uint64_t(p), int32_t(p), -1, BinaryOp::Or});
        std::vector<double> f(n_ops);
        for (std::size_t k = 0; k < n_ops; ++k)
          f[k] = length_factor(ctx.options.penalty, s.beam[p].entry.length + 1 + is_negated(ctx.options.ops[k]));
        factor[b].push_back(std::move(f));
      }
    }
  }
  // The row of beam entry p of unit b among all entries of the block.
  std::size_t entry(std::size_t b, int32_t p) const { return std::size_t(first_row[b] + p); }
  std::size_t n_entries() const { return std::size_t(first_row.back()); }

  const SearchContext& ctx;
  std::vector<UnitSearch*>& block;
  std::vector<int64_t> first_row;  // beam entries of the block, numbered unit by unit
  std::vector<TopK> next;          // per unit
  // Per unit, beam entry and operator k: penalty^(length - 1) of the extension.
  std::vector<std::vector<std::vector<double>>> factor;
};

// One unit's screening in one stage of a step: offers the candidates of the pairs whose
// counts are known, keeps the others that can still enter the beam (see expand_block).
class UnitScreen {
 public:
  UnitScreen(const SearchContext& ctx, UnitSearch& s, TopK& next, const std::vector<std::vector<double>>& factor)
      : ctx_(ctx),
        ops_(ctx.options.ops),
        s_(s),
        next_(next),
        factor_(factor),
        a_(int64_t(s.result.unit_size)),
        beam_size_(std::size_t(ctx.options.beam_size)),
        worst_(next.full() ? next.worst().score : -1.0) {}

  // The first stage: every pair (most are known exactly: single concepts, sparse units).
  void all_pairs() {
    for (int32_t p = 0; p < int32_t(s_.beam.size()); ++p) entry_pairs(p);
  }
  // A later stage: the pairs the previous one left, with more of their counts known.
  void pending_pairs(const std::vector<Pending>& pairs) {
    for (const Pending& x : pairs) consider(x);
  }
  // Books the stage's scored pairs (`counted`: after counting |F∧C|, else derived) and
  // returns the pairs left, less those that cannot beat the beam_size-th best score some
  // candidate surely reaches.
  std::vector<Pending> finish(bool counted) {
    (counted ? s_.result.counted : s_.result.derived) += scored_;
    for (const Candidate& kept : next_.items()) guaranteed_.push_back(kept.score);
    if (guaranteed_.size() >= beam_size_) {
      std::nth_element(guaranteed_.begin(), guaranteed_.begin() + std::ptrdiff_t(beam_size_ - 1), guaranteed_.end(),
                       std::greater<>());
      const double threshold = guaranteed_[beam_size_ - 1];
      const auto dropped =
          std::remove_if(left_.begin(), left_.end(), [&](const Pending& x) { return x.upper < threshold; });
      s_.result.pruned += uint64_t(left_.end() - dropped);
      left_.erase(dropped, left_.end());
    }
    return std::move(left_);
  }

 private:
  // The pairs of beam entry p: the concepts that may overlap F or A, in concept order,
  // then the others present (quiet), all at once.
  void entry_pairs(int32_t p) {
    const LiveEntry& parent = s_.beam[p];
    const int64_t f = int64_t(parent.entry.size), fa = int64_t(parent.entry.intersection);
    const std::vector<int32_t>& visited = ctx_.quiet_ops ? touching(parent) : ctx_.by_id;
    // consider()'s first lines, in line: most of these pairs are exact, and calling it
    // for each measured 3-4 % slower on `medium`.
    for (const int32_t concept : visited) {
      const int64_t c = int64_t(ctx_.concept_size[concept]);
      const int64_t ca = int64_t(s_.ca[concept]);
      const Interval fc = ctx_.overlap(parent, std::size_t(concept));
      const Interval fca = inside_overlap(f, fa, c, ca, a_, kUnknown, fc);
      if (fc.exact() && fca.exact())
        offer(p, concept, uint64_t(f), uint64_t(fa), uint64_t(c), uint64_t(ca), uint64_t(fc.lo), uint64_t(fca.lo));
      else
        consider({p, concept, fca, 0});
    }
    const uint64_t n_quiet = ctx_.by_id.size() - visited.size();
    if (n_quiet == 0) return;
    scored_ += n_quiet;
    quiet_pairs(p, n_quiet);
  }

  // The concepts that may overlap beam entry F or the unit, ascending (a scratch vector).
  const std::vector<int32_t>& touching(const LiveEntry& parent) {
    touching_.clear();
    ctx_.overlapping(parent, overlapping_);
    std::set_union(overlapping_.begin(), overlapping_.end(), s_.touching.begin(), s_.touching.end(),
                   std::back_inserter(touching_));
    return touching_;
  }

  // The candidates of beam entry p with the n_quiet quiet concepts that may enter the
  // top-k. A quiet concept C gives F OR C: I = |F∧A|, size |F| + |C| (its score falls as
  // |C| grows); F AND C: nothing (score 0); F AND NOT C: F itself. Among quiet concepts of
  // equal score the smaller concept id comes first, so beyond the first beam_size in
  // (score, id) order none can enter the top-k.
  void quiet_pairs(int32_t p, uint64_t n_quiet) {
    const LiveEntry& parent = s_.beam[p];
    const uint64_t f = parent.entry.size, fa = parent.entry.intersection, a = uint64_t(a_);
    quiet_.clear();
    for (const int32_t concept : ctx_.by_id) {
      if (quiet_.size() == std::min<uint64_t>(beam_size_, n_quiet)) break;
      if (ctx_.quiet(parent, std::size_t(concept), s_.ca[concept])) quiet_.push_back(concept);
    }
    for (std::size_t k = 0; k < ops_.size(); ++k) {
      const BinaryOp op = ops_[k];
      if (op != BinaryOp::Or) {
        for (const int32_t concept : quiet_)
          offer_op(p, concept, k, candidate_counts(op, f, fa, ctx_.concept_size[concept], 0, 0, 0, a, ctx_.total));
        continue;
      }
      uint64_t offered = 0;
      double last = 0;
      for (const int32_t concept : ctx_.by_size) {
        if (!ctx_.quiet(parent, std::size_t(concept), s_.ca[concept])) continue;
        const Counts n = candidate_counts(op, f, fa, ctx_.concept_size[concept], 0, 0, 0, a, ctx_.total);
        const double score = iou_of(n.intersection, n.size, a);
        if (offered >= beam_size_ && score < last) break;
        offer_op(p, concept, k, n);
        last = score;
        if (++offered == n_quiet) break;
      }
    }
  }

  // Offers candidate k (operator ops_[k]) of pair (p, concept) with counts n.
  void offer_op(int32_t p, int32_t concept, std::size_t k, Counts n) {
    const double fac = factor_[p][k];
    if (surely_below(n.intersection, n.size + uint64_t(a_) - n.intersection, fac, worst_)) return;
    const double score = iou_of(n.intersection, n.size, uint64_t(a_)) * fac;
    const uint64_t order =
        beam_size_ + (uint64_t(p) * uint64_t(ctx_.concepts.n_masks) + uint64_t(concept)) * ops_.size() + k;
    next_.offer({score, order, p, concept, ops_[k]});
    if (next_.full()) worst_ = next_.worst().score;
  }

  // Offers the candidates of a pair whose counts are all known.
  void offer(int32_t p, int32_t concept, uint64_t f, uint64_t fa, uint64_t c, uint64_t ca, uint64_t fc,
             uint64_t fca) {
    for (std::size_t k = 0; k < ops_.size(); ++k)
      offer_op(p, concept, k, candidate_counts(ops_[k], f, fa, c, ca, fc, fca, uint64_t(a_), ctx_.total));
    ++scored_;
  }

  // A pair with some count unknown: dropped, or kept with its score range.
  void consider(Pending x) {
    const LiveEntry& parent = s_.beam[x.parent];
    const double* fac = factor_[x.parent].data();
    const int64_t a = a_, total = int64_t(ctx_.total);
    const int64_t f = int64_t(parent.entry.size), fa = int64_t(parent.entry.intersection);
    const int64_t c = int64_t(ctx_.concept_size[x.concept]), ca = int64_t(s_.ca[x.concept]);
    const Interval fc = ctx_.overlap(parent, std::size_t(x.concept));
    x.fca = inside_overlap(f, fa, c, ca, a, x.fca, fc);
    if (fc.exact() && x.fca.exact()) {
      offer(x.parent, x.concept, uint64_t(f), uint64_t(fa), uint64_t(c), uint64_t(ca), uint64_t(fc.lo),
            uint64_t(x.fca.lo));
      return;
    }
    CountRange ranges[4];
    bool open = false;  // some candidate may still reach the top-k
    for (std::size_t k = 0; k < ops_.size(); ++k) {
      ranges[k] = count_range(ops_[k], f, fa, c, ca, a, total, x.fca, fc);
      open = open || !surely_below(uint64_t(ranges[k].i_hi), uint64_t(a + ranges[k].e_lo), fac[k], worst_);
    }
    if (!open) {
      ++s_.result.pruned;
      return;
    }
    x.upper = 0;
    for (std::size_t k = 0; k < ops_.size(); ++k) {
      const IouRange range = iou_range(ranges[k], a);
      x.upper = std::max(x.upper, range.hi * fac[k]);
      if (range.lo * fac[k] >= worst_) guaranteed_.push_back(range.lo * fac[k]);
    }
    left_.push_back(x);
  }

  const SearchContext& ctx_;
  const std::vector<BinaryOp>& ops_;
  UnitSearch& s_;
  TopK& next_;
  const std::vector<std::vector<double>>& factor_;
  const int64_t a_;  // |A|
  const std::size_t beam_size_;
  double worst_;  // scores below the top-k's worst can never enter it (it only gets better)
  std::vector<double> guaranteed_;  // scores some candidate surely reaches
  std::vector<Pending> left_;       // pairs still in question
  uint64_t scored_ = 0;             // pairs whose candidates were offered
  std::vector<int32_t> overlapping_, touching_, quiet_;  // scratch, per beam entry
};

// One screening stage of a step for every unit of the block (`first`: every pair, else
// the stage's pending ones; `counted`: whether |F∧C| was counted for this stage).
void screen_block(BlockStep& step, Stage& stage, bool first, bool counted) {
  parallel_for(int64_t(step.block.size()), [&](int64_t b) {
    UnitScreen screen(step.ctx, *step.block[b], step.next[b], step.factor[b]);
    if (first)
      screen.all_pairs();
    else
      screen.pending_pairs(stage[b]);
    stage[b] = screen.finish(counted);
  });
}

// The rows of a counting pass: F (inside = false) or F AND A (inside = true) of each beam
// entry with pending pairs, and per entry of the block its row (-1: none).
struct PassRows {
  std::vector<const SparseMask*> rows;
  std::vector<int64_t> row_of;
  int64_t row(const BlockStep& step, std::size_t b, const Pending& x) const { return row_of[step.entry(b, x.parent)]; }
};

PassRows pass_rows(const BlockStep& step, const Stage& stage, bool inside) {
  PassRows pass{{}, std::vector<int64_t>(step.n_entries(), -1)};
  for (std::size_t b = 0; b < stage.size(); ++b)
    for (const Pending& x : stage[b]) {
      int64_t& row = pass.row_of[step.entry(b, x.parent)];
      if (row >= 0) continue;
      row = int64_t(pass.rows.size());
      const LiveEntry& entry = step.block[b]->beam[x.parent];
      pass.rows.push_back(inside ? &entry.intersection : &entry.formula);
    }
  return pass;
}

// The pending pairs as (row, concept) pairs of a pass, numbered.
PairSet pass_pairs(const BlockStep& step, const Stage& stage, const PassRows& pass) {
  PairSet selected(int64_t(pass.rows.size()), step.ctx.concepts.n_masks);
  for (std::size_t b = 0; b < stage.size(); ++b)
    for (const Pending& x : stage[b]) selected.add(pass.row(step, b, x), x.concept);
  selected.number();
  return selected;
}

// Counts F (inside = false) or F AND A (inside = true) of the beam entries with pending
// pairs against those pairs' concepts, in one batched pass; hands each pair its count
// (take(b, pair, count)) and each unit its words. Returns false when no pair is pending.
template <typename Take>
bool count_pending(BlockStep& step, Stage& stage, bool inside, Take&& take) {
  const PassRows pass = pass_rows(step, stage, inside);
  if (pass.rows.empty()) return false;
  const PairSet selected = pass_pairs(step, stage, pass);
  const BatchCounts counted = step.ctx.count(PairCounter(pass.rows, step.ctx.concepts, step.ctx.index), &selected);
  parallel_for(int64_t(step.block.size()), [&](int64_t b) {
    UnitSearch& s = *step.block[b];
    for (std::size_t p = 0; p < s.beam.size(); ++p) {
      const int64_t row = pass.row_of[step.entry(std::size_t(b), int32_t(p))];
      if (row >= 0) s.result.words += counted.words[std::size_t(row)];
    }
    for (Pending& x : stage[b])
      take(b, x, counted.counts[std::size_t(selected.index(pass.row(step, std::size_t(b), x), x.concept))]);
  });
  return true;
}

// One expansion step for a block of units. Each (beam entry F, concept C) pair is first
// screened with what is known without counting (|F∧C| in the entry's intervals, exact for
// single concepts from the co-occurrence table), then with |F∧C∧A| counted for the pairs
// left (pass 1: cheap, F∧A lies inside the unit's few pixels), then with |F∧C| counted for
// the pairs still left (pass 2). Each pass counts the whole block in one batched pass over
// the concepts. Screening offers a pair's candidates when their counts are known, and
// drops a pair when the upper ends of its candidates' score ranges are below the
// beam_size-th best score some candidate surely reaches (exact scores, lower ends): such
// candidates cannot enter the beam. Offering candidates in any order gives the same top-k
// (a strict total order on (score, order)), so the result is the brute-force one.
void expand_block(const SearchContext& ctx, std::vector<UnitSearch*>& block, bool final) {
  BlockStep step(ctx, block);
  Stage stage(block.size());
  screen_block(step, stage, true, false);
  const auto unit_overlap = [](int64_t, Pending& x, uint64_t n) { x.fca = {int64_t(n), int64_t(n)}; };
  // From pass 2 on, |F AND C| is exact in the entry's intervals.
  const auto formula_overlap = [&](int64_t b, Pending& x, uint64_t n) {
    LiveEntry& parent = block[b]->beam[x.parent];
    ctx.store_overlaps(parent);
    parent.overlaps[x.concept] = {int64_t(n), int64_t(n)};
  };
  if (count_pending(step, stage, true, unit_overlap)) {
    screen_block(step, stage, false, false);
    if (count_pending(step, stage, false, formula_overlap)) screen_block(step, stage, false, true);
  }
  advance_block(ctx, block, step.next, final);
}

void check_same_grid(const MaskSetView& units, const MaskSetView& concepts) {
  if (!(units.grid == concepts.grid))
    throw std::invalid_argument("units and concepts are on different grids");
}

}  // namespace

std::vector<UnitResult> beam_search(const MaskSetView& units, int64_t unit_begin, int64_t unit_end,
                                    const MaskSetView& concepts, const SearchOptions& options,
                                    const uint64_t* cooccurrence, SearchStats* stats) {
  check_same_grid(units, concepts);
  if (options.length < 1 || options.length > kMaxLength)
    throw std::invalid_argument("length must be between 1 and " + std::to_string(kMaxLength));
  if (options.beam_size < 1 || options.beam_size > kMaxBeamSize)
    throw std::invalid_argument("beam_size must be between 1 and " + std::to_string(kMaxBeamSize));
  if (options.ops.empty() && options.length > 1) throw std::invalid_argument("no operators given");
  for (std::size_t k = 0; k < options.ops.size(); ++k)
    if (std::count(options.ops.begin(), options.ops.begin() + std::ptrdiff_t(k), options.ops[k]) != 0)
      throw std::invalid_argument("operator given twice");
  if (!(options.penalty > 0) || !std::isfinite(options.penalty))
    throw std::invalid_argument("penalty must be a positive finite number");
  if (unit_begin < 0 || unit_end > units.n_masks || unit_begin > unit_end)
    throw std::invalid_argument("unit range out of bounds");
  const int64_t n = unit_end - unit_begin, n_concepts = concepts.n_masks;
  std::vector<uint64_t> concept_size(static_cast<std::size_t>(n_concepts), 0);
  for (int64_t c = 0; c < n_concepts; ++c)
    for (int64_t e = concepts.offsets[c]; e < concepts.offsets[c + 1]; ++e) concept_size[c] += concepts.counts[e];
  const ImageMajorIndex index(concepts);
  std::vector<int32_t> by_id;
  for (int32_t c = 0; c < int32_t(n_concepts); ++c)
    if (concept_size[c] > 0) by_id.push_back(c);
  std::vector<int32_t> by_size = by_id;
  std::stable_sort(by_size.begin(), by_size.end(),
                   [&](int32_t x, int32_t y) { return concept_size[x] < concept_size[y]; });
  const bool quiet_ops = std::none_of(options.ops.begin(), options.ops.end(),
                                      [](BinaryOp op) { return op == BinaryOp::OrNot; });
  const SearchContext ctx{concepts, index, concept_size, options, concepts.grid.total_pixels(), cooccurrence, stats,
                          by_id, by_size, quiet_ops};
  const std::size_t beam_size = static_cast<std::size_t>(options.beam_size);

  std::vector<UnitSearch> searches;
  searches.reserve(std::size_t(n));
  for (int64_t i = 0; i < n; ++i) searches.push_back({SparseMask(concepts.grid), {}, {}, {}, {}});
  parallel_for(n, [&](int64_t i) { searches[i].unit = SparseMask::view_of(units, unit_begin + i); });

  // Primitives: concepts present in the data with IoU > 0, by IoU then concept id.
  std::vector<const SparseMask*> unit_rows;
  for (const UnitSearch& s : searches) unit_rows.push_back(&s.unit);
  const BatchCounts primitive_counts = ctx.count(PairCounter(unit_rows, concepts, index), nullptr);
  parallel_for(n, [&](int64_t i) {
    UnitSearch& s = searches[i];
    const uint64_t a = s.unit.total();
    s.result.unit_size = a;
    s.result.unit_images = s.unit.nonempty_images();
    s.result.words = primitive_counts.words[i];
    s.ca.assign(std::size_t(n_concepts), 0);
    TopK primitives(beam_size);
    for (int64_t c = 0; c < n_concepts; ++c) {
      if (concept_size[c] == 0) continue;
      s.ca[c] = primitive_counts.counts[std::size_t(c) * n + i];
      if (s.ca[c] > 0) s.touching.push_back(int32_t(c));
      const double iou = iou_of(s.ca[c], concept_size[c], a);
      if (iou > 0) primitives.offer({iou, uint64_t(c), -1, int32_t(c), BinaryOp::Or});
    }
    for (const Candidate& p : primitives.items()) s.beam.push_back(primitive_entry(ctx, s.unit, p.concept, p.score));
    if (!s.beam.empty()) {
      s.result.primitive = s.beam.front().entry.concepts.front();
      s.result.primitive_iou = s.beam.front().entry.iou;
    }
  });

  // Expansion steps, for blocks of units whose beams fit the memory budget together.
  std::vector<UnitSearch*> block;
  std::size_t block_bytes = 0;
  const auto run_block = [&] {
    for (int step = 1; step < options.length; ++step) {
      std::vector<UnitSearch*> moving;
      for (UnitSearch* s : block)
        if (!s->settled) moving.push_back(s);
      if (moving.empty()) break;
      expand_block(ctx, moving, step == options.length - 1);
    }
    for (UnitSearch* s : block) {
      for (LiveEntry& live : s->beam) s->result.beam.push_back(std::move(live.entry));
      s->beam.clear();
    }
    block.clear();
    block_bytes = 0;
  };
  for (UnitSearch& s : searches) {
    if (s.beam.empty()) continue;
    std::size_t bytes = 0;
    // The next beam's formulas take about as much as these (single concepts are read in
    // place, their extensions are built), both sit in memory during a step.
    for (const LiveEntry& live : s.beam) bytes += 2 * (live.formula.bitset_bytes() + live.intersection.bitset_bytes());
    if (!block.empty() && block_bytes + bytes > options.block_bytes) run_block();
    block.push_back(&s);
    block_bytes += bytes;
  }
  run_block();

  std::vector<UnitResult> results;
  results.reserve(std::size_t(n));
  for (UnitSearch& s : searches) results.push_back(std::move(s.result));
  return results;
}

void intersection_counts(const MaskSetView& units, int64_t unit_begin, int64_t unit_end,
                         const MaskSetView& concepts, int64_t* out) {
  check_same_grid(units, concepts);
  if (unit_begin < 0 || unit_end > units.n_masks || unit_begin > unit_end)
    throw std::invalid_argument("unit range out of bounds");
  const int64_t n = unit_end - unit_begin;
  std::vector<SparseMask> masks(static_cast<std::size_t>(n));
  parallel_for(n, [&](int64_t i) { masks[i] = SparseMask::view_of(units, unit_begin + i); });
  std::vector<const SparseMask*> rows;
  for (const SparseMask& m : masks) rows.push_back(&m);
  const ImageMajorIndex index(concepts);
  const BatchCounts counted = PairCounter(rows, concepts, index).count(nullptr);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t c = 0; c < concepts.n_masks; ++c)
      out[i * concepts.n_masks + c] = static_cast<int64_t>(counted.counts[std::size_t(c) * n + i]);
}

void concept_cooccurrence(const MaskSetView& concepts, uint64_t* out, SearchStats* stats) {
  const int64_t n = concepts.n_masks;
  const std::size_t w = concepts.grid.words_per_image;
  const ImageMajorIndex index(concepts);
  std::fill(out, out + std::size_t(n) * std::size_t(n), uint64_t(0));
  // Image by image, each concept k against the concepts j <= k present there: one
  // one-against-many kernel call per (image, k) over the image's bitsets, which stay in
  // L1/L2. Tasks own ranges of k (rows k of `out`); the upper triangle is mirrored last.
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(n, 4 * int64_t(num_threads())));
  const AndPopcountManyFn many = and_popcount_many_kernel();
  std::mutex stats_mutex;
  const auto start = std::chrono::steady_clock::now();
  parallel_for(tasks, [&](int64_t task) {
    const int32_t k0 = int32_t(n * task / tasks), k1 = int32_t(n * (task + 1) / tasks);
    std::vector<const uint64_t*> bits;  // the image's bitsets, by concept
    std::vector<int32_t> ids;           // their concepts
    std::vector<uint64_t> results;
    uint64_t words = 0;
    for (uint32_t i = 0; i < concepts.grid.n_images; ++i) {
      const ImageMajorIndex::Entry* first = index.begin(i);
      const ImageMajorIndex::Entry* last = index.end(i);
      if (first == last || first->mask >= k1 || (last - 1)->mask < k0) continue;
      bits.clear();
      ids.clear();
      for (const ImageMajorIndex::Entry* e = first; e != last && e->mask < k1; ++e) {
        uint64_t* row = out + std::size_t(e->mask) * std::size_t(n);
        const bool mine = e->mask >= k0;
        if (e->slot == kFullSlot) {  // full: |k AND j| = |j| for every j <= k
          if (mine)
            for (const ImageMajorIndex::Entry* j = first; j <= e; ++j) row[j->mask] += uint64_t(j->count);
          continue;
        }
        const uint64_t* mask = concepts.bitset(e->slot);
        bits.push_back(mask);
        ids.push_back(e->mask);
        if (!mine) continue;
        for (const ImageMajorIndex::Entry* j = first; j < e; ++j)  // full j: |k|
          if (j->slot == kFullSlot) row[j->mask] += uint64_t(e->count);
        results.resize(bits.size());
        many(mask, bits.data(), bits.size(), w, results.data());
        for (std::size_t j = 0; j < bits.size(); ++j) row[ids[j]] += results[j];
        words += bits.size() * w;
      }
    }
    std::lock_guard<std::mutex> lock(stats_mutex);
    if (stats != nullptr) stats->count_words += words;
  });
  if (stats != nullptr)
    stats->count_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  for (int64_t k = 0; k < n; ++k)
    for (int64_t j = 0; j < k; ++j) out[std::size_t(j) * n + k] = out[std::size_t(k) * n + j];
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
