// The batched counting pass (PairCounter) on both of its paths, the sparse one and the
// tiled one (and the choice between them), at every SIMD level and 1 or 3 threads,
// against counts taken pixel by pixel on masks held as one byte per pixel: rows and
// columns mixing empty, full and partial images, rows over a few nearby words (as the
// beam entries of one unit), identical rows and columns (ties), more than 64 rows, pixel
// counts not a multiple of 64, and pair selections from none to all.
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "batch_count.hpp"
#include "check.hpp"
#include "dense.hpp"
#include "popcount.hpp"
#include "thread_pool.hpp"

using namespace pyneuron_test;
using pyneuron::BatchCounts;
using pyneuron::CountPath;
using pyneuron::ImageMajorIndex;
using pyneuron::PairCounter;
using pyneuron::PairSet;
using pyneuron::SparseMask;

namespace {

// |x AND y| pixel by pixel.
uint64_t naive_and(const Bits& x, const Bits& y) {
  uint64_t n = 0;
  for (std::size_t k = 0; k < x.size(); ++k) n += x[k] & y[k];
  return n;
}

// A mask inside a window of the image around `center` (a unit's pixels), each pixel with
// probability p: rows of nearby words, grouped by the tiled path.
Bits local_mask(const Grid& g, std::mt19937_64& rng, uint64_t center, uint64_t radius, double p) {
  Bits m(g.n_images * g.pixels, 0);
  for (uint64_t i = 0; i < g.n_images; ++i) {
    if (rng() % 4 == 0) continue;
    for (uint64_t k = center > radius ? center - radius : 0; k < std::min(g.pixels, center + radius); ++k)
      m[i * g.pixels + k] = double(rng() >> 11) * 0x1.0p-53 < p;
  }
  return m;
}

struct Case {
  Grid grid;
  std::vector<Bits> rows, columns;
};

Case make_case(uint64_t n_images, uint64_t pixels, std::size_t n_rows, std::size_t n_columns, std::mt19937_64& rng) {
  Case c{Grid(n_images, pixels), {}, {}};
  const Grid& g = c.grid;
  for (std::size_t r = 0; r < n_rows; ++r) {
    const int kind = int(rng() % 4);
    if (kind == 0 && r > 0)
      c.rows.push_back(c.rows[rng() % r]);  // a tie
    else if (kind == 1)
      c.rows.push_back(local_mask(g, rng, rng() % g.pixels, 1 + rng() % 150, 0.5));
    else
      c.rows.push_back(random_mask(g, rng));
  }
  for (std::size_t j = 0; j < n_columns; ++j) {
    if (j == 0) {
      c.columns.emplace_back(g.n_images * g.pixels, 0);  // empty
    } else if (j == 1) {
      c.columns.emplace_back(g.n_images * g.pixels, 1);  // full
    } else if (j % 5 == 0) {
      c.columns.push_back(c.columns[rng() % j]);  // a tie
    } else {
      c.columns.push_back(random_mask(g, rng));
    }
  }
  return c;
}

// Every path of PairCounter::count against the pixel-by-pixel counts, for the selections
// given by their densities (negative: all pairs, no selection).
void check_case(const Case& c, std::mt19937_64& rng) {
  const OwnedMaskSet rows_set = build_mask_set(c.grid, c.rows);
  const OwnedMaskSet columns_set = build_mask_set(c.grid, c.columns);
  std::vector<SparseMask> masks;
  for (std::size_t r = 0; r < c.rows.size(); ++r) masks.push_back(SparseMask::from_set(rows_set.view, int64_t(r)));
  std::vector<const SparseMask*> rows;
  for (const SparseMask& m : masks) rows.push_back(&m);
  const ImageMajorIndex index(columns_set.view);
  const int64_t n_rows = int64_t(rows.size()), n_columns = int64_t(c.columns.size());
  std::vector<uint64_t> expected(std::size_t(n_rows * n_columns));
  for (int64_t j = 0; j < n_columns; ++j)
    for (int64_t r = 0; r < n_rows; ++r) expected[std::size_t(j * n_rows + r)] = naive_and(c.rows[r], c.columns[j]);
  for (const double density : {-1.0, 0.0, 0.1, 0.5, 0.9, 1.0}) {
    PairSet pairs(n_rows, n_columns);
    std::vector<std::pair<int64_t, int64_t>> chosen;
    for (int64_t j = 0; j < n_columns; ++j)
      for (int64_t r = 0; r < n_rows; ++r)
        if (double(rng() >> 11) * 0x1.0p-53 < density) {
          pairs.add(r, j);
          chosen.push_back({r, j});
        }
    pairs.number();
    for (const CountPath path : {CountPath::Sparse, CountPath::Tiled, CountPath::Auto}) {
      Scope scope("selection density " + std::to_string(density) + ", path " + std::to_string(int(path)));
      const PairCounter counter(rows, columns_set.view, index);
      const BatchCounts counted = counter.count(density < 0 ? nullptr : &pairs, path);
      CHECK_EQ(counted.words.size(), std::size_t(n_rows));
      if (density < 0) {
        CHECK(counted.counts == expected);
        continue;
      }
      CHECK_EQ(counted.counts.size(), chosen.size());
      if (counted.counts.size() != chosen.size()) continue;
      bool same = true;
      for (const auto& [r, j] : chosen)
        same = same && counted.counts[std::size_t(pairs.index(r, j))] == expected[std::size_t(j * n_rows + r)];
      CHECK(same);
    }
  }
}

// Restores the level and the threads in use when a case ends.
struct KeepSettings {
  std::string level = pyneuron::simd_level();
  int threads = pyneuron::num_threads();
  ~KeepSettings() {
    pyneuron::set_simd_level(level);
    pyneuron::set_num_threads(threads);
  }
};

}  // namespace

TEST_CASE(pair_counter_paths) {
  KeepSettings keep;
  std::mt19937_64 rng(25);
  // (images, pixels per image, rows, columns): 1 to 41 words per image, 1 to 70 rows.
  const uint64_t shapes[][4] = {{6, 1, 3, 4},     {7, 100, 5, 13},  {5, 197, 9, 7},
                                {9, 700, 12, 21}, {4, 2627, 6, 11}, {8, 333, 70, 9}};
  for (const std::string& level : pyneuron::available_simd_levels()) {
    pyneuron::set_simd_level(level);
    for (const int threads : {1, 3}) {
      if (threads > pyneuron::max_threads()) continue;
      pyneuron::set_num_threads(threads);
      Scope scope("level " + level + ", threads " + std::to_string(threads));
      for (const auto& s : shapes) {
        Scope shape("images " + std::to_string(s[0]) + ", pixels " + std::to_string(s[1]) + ", rows " +
                    std::to_string(s[2]) + ", columns " + std::to_string(s[3]));
        check_case(make_case(s[0], s[1], std::size_t(s[2]), std::size_t(s[3]), rng), rng);
      }
    }
  }
}

TEST_MAIN()
