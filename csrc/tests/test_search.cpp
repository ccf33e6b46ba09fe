// The beam search (and the counting primitives behind it) against brute force written here
// from DESIGN.md's rules, on masks held as one byte per pixel:
// - a literal beam search (primitives with IoU > 0 by IoU then id; each step: the old beam,
//   then every (parent, concept, op) candidate in that order, stable-sorted by score,
//   first beam_size kept; score = IoU * penalty^(len - 1), NOT counting one more; absent
//   concepts never candidates), compared entry by entry with the whole final beam;
// - an exhaustive enumeration of every left-deep formula of up to 3 concepts, whose best
//   IoU the search must reach on a small case with a planted unit.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "check.hpp"
#include "dense.hpp"
#include "popcount.hpp"
#include "search.hpp"
#include "thread_pool.hpp"

using namespace pyneuron_test;
using pyneuron::BeamEntry;
using pyneuron::SearchOptions;
using pyneuron::UnitResult;

namespace {

const std::vector<BinaryOp> kDefaultOps{BinaryOp::Or, BinaryOp::And, BinaryOp::AndNot};
const std::vector<BinaryOp> kAllOps{BinaryOp::Or, BinaryOp::And, BinaryOp::AndNot, BinaryOp::OrNot};

double iou(uint64_t inter, uint64_t size, uint64_t unit) {
  return double(inter) / (double(size) + double(unit) - double(inter) + 1e-10);
}

bool negated(BinaryOp op) { return op == BinaryOp::AndNot || op == BinaryOp::OrNot; }

const char* op_name(BinaryOp op) {
  switch (op) {
    case BinaryOp::Or: return "OR";
    case BinaryOp::And: return "AND";
    case BinaryOp::AndNot: return "AND NOT";
    case BinaryOp::OrNot: return "OR NOT";
  }
  return "?";
}

// Left-deep formula as DESIGN.md prints it: ((c0 OR c1) AND NOT c2).
std::string print(const std::vector<int32_t>& concepts, const std::vector<BinaryOp>& ops) {
  if (concepts.empty()) return "<none>";
  std::string text = "c" + std::to_string(concepts[0]);
  for (std::size_t k = 0; k < ops.size(); ++k)
    text = (k == 0 ? "" : "(") + text + (k == 0 ? "" : ")") + " " + op_name(ops[k]) + " c" +
           std::to_string(concepts[k + 1]);
  return ops.empty() ? text : "(" + text + ")";
}

struct Formula {
  std::vector<int32_t> concepts;
  std::vector<BinaryOp> ops;
  int length = 0;
  double score = 0;
  Bits mask;
};

struct Expected {
  std::vector<Formula> beam;
  int32_t primitive = -1;
  double primitive_iou = 0;
};

// The literal beam search of DESIGN.md on byte-per-pixel masks.
Expected literal_beam_search(const Grid& g, const std::vector<Bits>& concepts, const Bits& unit,
                             const SearchOptions& options) {
  const uint64_t a = count_bits(unit);
  const auto score_of = [&](const Bits& mask, int length) {
    const Bits inter = apply(BinaryOp::And, mask, unit);
    return iou(count_bits(inter), count_bits(mask), a) * std::pow(options.penalty, double(length - 1));
  };
  std::vector<int32_t> present;
  for (int32_t c = 0; c < int32_t(concepts.size()); ++c)
    if (count_bits(concepts[std::size_t(c)]) > 0) present.push_back(c);
  (void)g;

  std::vector<Formula> beam;
  for (const int32_t c : present) {
    const double s = score_of(concepts[std::size_t(c)], 1);
    if (s > 0) beam.push_back({{c}, {}, 1, s, concepts[std::size_t(c)]});
  }
  const auto by_score = [](const Formula& x, const Formula& y) { return x.score > y.score; };
  std::stable_sort(beam.begin(), beam.end(), by_score);
  if (beam.size() > std::size_t(options.beam_size)) beam.resize(std::size_t(options.beam_size));
  Expected expected;
  if (!beam.empty()) {
    expected.primitive = beam[0].concepts[0];
    expected.primitive_iou = beam[0].score;
  }
  for (int step = 1; step < options.length && !beam.empty(); ++step) {
    std::vector<Formula> next = beam;
    for (const Formula& parent : beam) {
      for (const int32_t c : present) {
        for (const BinaryOp op : options.ops) {
          Formula f = parent;
          f.concepts.push_back(c);
          f.ops.push_back(op);
          f.length += 1 + negated(op);
          f.mask = apply(op, parent.mask, concepts[std::size_t(c)]);
          f.score = score_of(f.mask, f.length);
          next.push_back(std::move(f));
        }
      }
    }
    std::stable_sort(next.begin(), next.end(), by_score);
    if (next.size() > std::size_t(options.beam_size)) next.resize(std::size_t(options.beam_size));
    beam = std::move(next);
  }
  expected.beam = std::move(beam);
  return expected;
}

// The search's result for one unit equals the literal search's, entry by entry.
void check_unit(const Grid& g, const UnitResult& r, const Expected& expected, const Bits& unit) {
  CHECK_EQ(r.unit_size, count_bits(unit));
  CHECK_EQ(r.unit_images, nonempty_images(g, unit));
  CHECK_EQ(r.primitive, expected.primitive);
  CHECK_EQ(r.primitive_iou, expected.primitive_iou);
  CHECK_EQ(r.beam.size(), expected.beam.size());
  for (std::size_t j = 0; j < std::min(r.beam.size(), expected.beam.size()); ++j) {
    const BeamEntry& got = r.beam[j];
    const Formula& want = expected.beam[j];
    Scope scope("beam entry " + std::to_string(j) + ", expected " + print(want.concepts, want.ops));
    CHECK_EQ(print(got.concepts, got.ops), print(want.concepts, want.ops));
    CHECK_EQ(got.length, want.length);
    CHECK_EQ(got.score, want.score);  // exact: the same float64 as brute force
    const Bits inter = apply(BinaryOp::And, want.mask, unit);
    CHECK_EQ(got.iou, iou(count_bits(inter), count_bits(want.mask), count_bits(unit)));
    CHECK_EQ(got.size, count_bits(want.mask));
    CHECK_EQ(got.intersection, count_bits(inter));
    CHECK_EQ(got.size_images, nonempty_images(g, want.mask));
    CHECK_EQ(got.intersection_images, nonempty_images(g, inter));
  }
}

// Restores the thread setting and SIMD level when a case ends.
struct KeepSettings {
  int threads = pyneuron::num_threads();
  std::string level = pyneuron::simd_level();
  ~KeepSettings() {
    pyneuron::set_num_threads(threads);
    pyneuron::set_simd_level(level);
  }
};

std::string describe(const SearchOptions& o) {
  std::string text = "length " + std::to_string(o.length) + ", beam " + std::to_string(o.beam_size) +
                     ", penalty " + show(o.penalty) + ", ops";
  for (const BinaryOp op : o.ops) text += std::string(" ") + op_name(op);
  return text;
}

// Runs the search under every combination of the settings that must not change its
// result (SIMD level, 1 or 2 threads, with or without the co-occurrence table, units in one
// block or one block each) and checks every unit against the literal search.
void check_search(const Grid& g, const std::vector<Bits>& concepts, const std::vector<Bits>& units,
                  const SearchOptions& options) {
  const OwnedMaskSet concept_set = build_mask_set(g, concepts);
  const OwnedMaskSet unit_set = build_mask_set(g, units);
  std::vector<Expected> expected;
  for (const Bits& unit : units) expected.push_back(literal_beam_search(g, concepts, unit, options));
  std::vector<uint64_t> cooccurrence(concepts.size() * concepts.size());
  pyneuron::concept_cooccurrence(concept_set.view, cooccurrence.data());
  KeepSettings keep;
  for (const std::string& level : pyneuron::available_simd_levels()) {
    pyneuron::set_simd_level(level);
    for (const int threads : {1, 2}) {
      pyneuron::set_num_threads(threads);
      for (const bool with_table : {false, true}) {
        for (const std::size_t block_bytes : {std::size_t(128) << 20, std::size_t(1)}) {
          SearchOptions o = options;
          o.block_bytes = block_bytes;
          Scope scope(describe(o) + ", " + level + ", " + std::to_string(threads) + " thread(s)" +
                      (with_table ? ", co-occurrence table" : "") + (block_bytes == 1 ? ", one unit per block" : ""));
          // A unit range that is not the whole set, too.
          const int64_t begin = block_bytes == 1 && units.size() > 2 ? 1 : 0;
          const std::vector<UnitResult> results = pyneuron::beam_search(
              unit_set.view, begin, unit_set.view.n_masks, concept_set.view, o,
              with_table ? cooccurrence.data() : nullptr);
          CHECK_EQ(results.size(), units.size() - std::size_t(begin));
          for (std::size_t u = 0; u < std::min(results.size(), units.size() - std::size_t(begin)); ++u) {
            Scope unit_scope("unit " + std::to_string(u + std::size_t(begin)));
            check_unit(g, results[u], expected[u + std::size_t(begin)], units[u + std::size_t(begin)]);
          }
        }
      }
    }
  }
}

// The small case: 4 images of 70 pixels (two words each, padded); concepts c0..c2 with a
// mix of containers, c3 image-level (full images only), c4 absent from the data; units: the
// planted (c0 OR c1) AND NOT c2, the same with a few pixels flipped, one concept alone, a
// random mask and an empty unit.
struct SmallCase {
  Grid g{4, 70};
  std::vector<Bits> concepts, units;
  SmallCase() {
    std::mt19937_64 rng(31337);
    const uint64_t p = g.pixels, n = g.n_images * p;
    const auto unit = [&] { return double(rng() >> 11) * 0x1.0p-53; };
    const auto random_in = [&](std::initializer_list<uint64_t> images, double density) {
      Bits m(n, 0);
      for (const uint64_t i : images)
        for (uint64_t k = 0; k < p; ++k) m[i * p + k] = unit() < density;
      return m;
    };
    Bits c0 = random_in({0, 1, 2}, 0.5);
    for (uint64_t k = 0; k < p; ++k) c0[3 * p + k] = 1;  // full in image 3
    const Bits c1 = random_in({1, 2, 3}, 0.35);
    const Bits c2 = random_in({0, 1, 2, 3}, 0.15);
    Bits c3(n, 0);
    for (const uint64_t i : {uint64_t(0), uint64_t(2)})
      for (uint64_t k = 0; k < p; ++k) c3[i * p + k] = 1;
    concepts = {c0, c1, c2, c3, Bits(n, 0)};

    const Bits planted = apply(BinaryOp::AndNot, apply(BinaryOp::Or, c0, c1), c2);
    Bits noisy = planted;
    for (int k = 0; k < 8; ++k) noisy[rng() % n] ^= 1;
    units = {planted, noisy, c1, random_in({1, 3}, 0.1), Bits(n, 0)};
  }
};

// All left-deep formulas with 1 to 3 concepts (present ones) and OR / AND / AND NOT:
// the largest IoU with the unit, and the formulas reaching it.
struct Exhaustive {
  double best = 0;
  std::vector<std::string> best_formulas;
};
Exhaustive enumerate_formulas(const std::vector<Bits>& concepts, const Bits& unit) {
  std::vector<int32_t> present;
  for (int32_t c = 0; c < int32_t(concepts.size()); ++c)
    if (count_bits(concepts[std::size_t(c)]) > 0) present.push_back(c);
  const uint64_t a = count_bits(unit);
  Exhaustive result;
  const auto consider = [&](const Bits& mask, const std::vector<int32_t>& cs, const std::vector<BinaryOp>& ops) {
    const double value = iou(count_bits(apply(BinaryOp::And, mask, unit)), count_bits(mask), a);
    if (value > result.best) {
      result.best = value;
      result.best_formulas.clear();
    }
    if (value == result.best && value > 0) result.best_formulas.push_back(print(cs, ops));
  };
  for (const int32_t x : present) {
    const Bits& fx = concepts[std::size_t(x)];
    consider(fx, {x}, {});
    for (const int32_t y : present)
      for (const BinaryOp op1 : kDefaultOps) {
        const Bits fxy = apply(op1, fx, concepts[std::size_t(y)]);
        consider(fxy, {x, y}, {op1});
        for (const int32_t z : present)
          for (const BinaryOp op2 : kDefaultOps)
            consider(apply(op2, fxy, concepts[std::size_t(z)]), {x, y, z}, {op1, op2});
      }
  }
  return result;
}

}  // namespace

// The planted unit is found: the best formula of the default search (length 3, beam 5) is
// the planted one, with IoU |A| / (|A| + 1e-10), as the exhaustive enumeration's best.
TEST_CASE(planted_formula_is_found) {
  const SmallCase data;
  const OwnedMaskSet concepts = build_mask_set(data.g, data.concepts);
  const OwnedMaskSet units = build_mask_set(data.g, data.units);
  // Container mix of the fixture, as described.
  CHECK(std::count(concepts.slots.begin(), concepts.slots.end(), pyneuron::kFullSlot) == 3);
  CHECK_EQ(concepts.offsets[5] - concepts.offsets[4], int64_t(0));
  SearchOptions options;  // length 3, beam 5, OR / AND / AND NOT, penalty 1
  const std::vector<UnitResult> results = pyneuron::beam_search(units.view, 0, units.view.n_masks, concepts.view, options);
  CHECK_EQ(results.size(), data.units.size());
  if (results.empty() || results[0].beam.empty()) {
    CHECK(!results.empty() && !results[0].beam.empty());
    return;
  }
  const BeamEntry& best = results[0].beam[0];
  const uint64_t a = count_bits(data.units[0]);
  CHECK(a > 0);
  std::printf("  planted unit (|A| = %llu): best %s, IoU %.17g\n", (unsigned long long)a,
              print(best.concepts, best.ops).c_str(), best.iou);
  CHECK_EQ(print(best.concepts, best.ops), std::string("((c0 OR c1) AND NOT c2)"));
  CHECK_EQ(best.iou, double(a) / (double(a) + 1e-10));
  CHECK_EQ(best.intersection, a);
  CHECK_EQ(best.size, a);
  CHECK_EQ(best.length, 4);  // three leaves and one NOT
  // The exhaustive enumeration agrees on the best IoU for every unit, and the search's
  // best formula is one of those reaching it (the beam of 5 happens to suffice here).
  for (std::size_t u = 0; u < data.units.size(); ++u) {
    Scope scope("unit " + std::to_string(u));
    const Exhaustive all = enumerate_formulas(data.concepts, data.units[u]);
    if (all.best_formulas.empty()) {
      CHECK(results[u].beam.empty());
      CHECK_EQ(results[u].primitive, int32_t(-1));
      continue;
    }
    if (results[u].beam.empty()) {
      CHECK(!results[u].beam.empty());
      continue;
    }
    const BeamEntry& top = results[u].beam[0];
    CHECK_EQ(top.iou, all.best);
    const std::string formula = print(top.concepts, top.ops);
    CHECK(std::find(all.best_formulas.begin(), all.best_formulas.end(), formula) != all.best_formulas.end());
  }
}

// The whole final beam of the small case equals the literal search's, for several lengths,
// beam sizes (1 to exhaustive), penalties and operator sets, at every SIMD level, with 1
// and 2 threads, with and without the co-occurrence table.
TEST_CASE(small_case_whole_beam) {
  const SmallCase data;
  for (const int length : {1, 2, 3, 4}) {
    for (const int beam_size : {1, 2, 5, 12}) {
      SearchOptions o;
      o.length = length;
      o.beam_size = beam_size;
      check_search(data.g, data.concepts, data.units, o);
    }
  }
  SearchOptions o;
  o.beam_size = 1024;  // every candidate of length 3 kept: 4 + 48 + 624 entries
  check_search(data.g, data.concepts, data.units, o);
  // The exhaustive beam's best is the enumeration's best.
  const OwnedMaskSet concepts = build_mask_set(data.g, data.concepts);
  const OwnedMaskSet units = build_mask_set(data.g, data.units);
  const std::vector<UnitResult> results = pyneuron::beam_search(units.view, 0, units.view.n_masks, concepts.view, o);
  for (std::size_t u = 0; u < data.units.size(); ++u) {
    Scope scope("unit " + std::to_string(u));
    const Exhaustive all = enumerate_formulas(data.concepts, data.units[u]);
    CHECK_EQ(results[u].beam.empty(), all.best_formulas.empty());
    // k primitives (concepts overlapping the unit): k + 12k after one step, 13k + 12 * 13k
    // after two; every candidate is kept (at most 4 + 48 + 624).
    std::size_t k = 0;
    for (const Bits& c : data.concepts) k += count_bits(apply(BinaryOp::And, c, data.units[u])) > 0;
    CHECK_EQ(results[u].beam.size(), 169 * k);
    if (!results[u].beam.empty()) {
      CHECK_EQ(results[u].beam[0].iou, all.best);
    }
  }
  for (const double penalty : {0.5, 0.9, 1.5}) {
    o.penalty = penalty;
    o.beam_size = 5;
    check_search(data.g, data.concepts, data.units, o);
  }
  o.penalty = 1.0;
  o.ops = kAllOps;
  check_search(data.g, data.concepts, data.units, o);
  o.ops = {BinaryOp::AndNot, BinaryOp::Or};  // another order of the operators
  check_search(data.g, data.concepts, data.units, o);
}

// Random small data sets (grids of 1 to 6 images and 1 to 130 pixels, 1 to 7 concepts,
// some absent): many ties, empty and full images; the whole final beam as above.
TEST_CASE(random_cases_whole_beam) {
  std::mt19937_64 rng(4242);
  const uint64_t pixel_counts[] = {1, 3, 9, 64, 70, 130};
  for (int trial = 0; trial < 60; ++trial) {
    const Grid g(1 + rng() % 6, pixel_counts[rng() % 6]);
    const std::size_t n_concepts = 1 + rng() % 7;
    std::vector<Bits> concepts, units;
    for (std::size_t c = 0; c < n_concepts; ++c)
      concepts.push_back(rng() % 6 == 0 ? Bits(g.n_images * g.pixels, 0) : random_mask(g, rng));
    for (int u = 0; u < 4; ++u) units.push_back(random_mask(g, rng));
    // A unit built from concepts, as a real one often nearly is.
    units.push_back(apply(BinaryOp::AndNot, concepts[0], concepts[n_concepts - 1]));
    Scope scope("trial " + std::to_string(trial) + ", grid " + std::to_string(g.n_images) + "x" +
                std::to_string(g.pixels) + ", " + std::to_string(n_concepts) + " concepts");
    SearchOptions o;
    o.length = 1 + int(rng() % 4);
    o.beam_size = 1 + int(rng() % 6);
    o.penalty = (trial % 3 == 0) ? 0.75 : 1.0;
    o.ops = (trial % 4 == 1) ? kAllOps : kDefaultOps;
    check_search(g, concepts, units, o);
  }
}

// The counting primitives: co-occurrence table, unit-concept intersections, formula
// programs (evaluate) and formula_counts, against bytewise counts.
TEST_CASE(counting_primitives) {
  const SmallCase data;
  const Grid& g = data.g;
  const OwnedMaskSet concepts = build_mask_set(g, data.concepts);
  const OwnedMaskSet units = build_mask_set(g, data.units);
  const std::size_t nc = data.concepts.size(), nu = data.units.size();
  std::vector<uint64_t> table(nc * nc);
  pyneuron::concept_cooccurrence(concepts.view, table.data());
  for (std::size_t c = 0; c < nc; ++c)
    for (std::size_t d = 0; d < nc; ++d)
      CHECK_EQ(table[c * nc + d], count_bits(apply(BinaryOp::And, data.concepts[c], data.concepts[d])));
  std::vector<int64_t> inter(nu * nc);
  pyneuron::intersection_counts(units.view, 0, int64_t(nu), concepts.view, inter.data());
  for (std::size_t u = 0; u < nu; ++u)
    for (std::size_t c = 0; c < nc; ++c)
      CHECK_EQ(uint64_t(inter[u * nc + c]), count_bits(apply(BinaryOp::And, data.units[u], data.concepts[c])));
  // ((c0 OR c1) AND NOT c2) as a postfix program: c0 c1 OR c2 NOT AND.
  const std::vector<int32_t> program{0, 1, pyneuron::kProgramOr, 2, pyneuron::kProgramNot, pyneuron::kProgramAnd};
  const pyneuron::SparseMask f = pyneuron::evaluate(program, concepts.view);
  bool padding = true;
  CHECK(unpack(g, f.to_words(), &padding) == data.units[0]);
  CHECK(!padding);
  std::vector<uint64_t> fa(nu), fa_images(nu);
  pyneuron::formula_counts(f, units.view, fa.data(), fa_images.data());
  for (std::size_t u = 0; u < nu; ++u) {
    const Bits both = apply(BinaryOp::And, data.units[0], data.units[u]);
    CHECK_EQ(fa[u], count_bits(both));
    CHECK_EQ(fa_images[u], nonempty_images(g, both));
  }
  CHECK_THROWS(pyneuron::evaluate({0, pyneuron::kProgramAnd}, concepts.view), std::invalid_argument);
  CHECK_THROWS(pyneuron::evaluate({int32_t(nc)}, concepts.view), std::invalid_argument);
}

TEST_MAIN()
