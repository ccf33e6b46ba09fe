// AND+popcount kernels at every SIMD level the CPU has, selected through the dispatch
// module's run-time override (what PYNEURON_SIMD and pyneuron.set_simd_level use), against
// a bit-by-bit loop.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "check.hpp"
#include "popcount.hpp"

using namespace pyneuron_test;

namespace {

const char* const kAllLevels[] = {"scalar", "avx2", "avx512"};

bool available(const std::string& level) {
  for (const std::string& l : pyneuron::available_simd_levels())
    if (l == level) return true;
  return false;
}

// The levels to test: every known level the CPU and build have; the others are reported.
std::vector<std::string> levels_to_test() {
  std::vector<std::string> levels;
  for (const char* level : kAllLevels) {
    if (available(level))
      levels.emplace_back(level);
    else
      std::printf("  SKIPPED SIMD level %s: not available on this CPU or build\n", level);
  }
  return levels;
}

uint64_t naive_and_popcount(const uint64_t* a, const uint64_t* b, std::size_t n) {
  uint64_t total = 0;
  for (std::size_t i = 0; i < n; ++i)
    for (int bit = 0; bit < 64; ++bit) total += ((a[i] >> bit) & (b[i] >> bit) & 1);
  return total;
}

// Lengths in words: every length up to 70 (0, 1, 63, 64, 65 among them) and a few around
// the kernels' 4-, 8- and 16-word blocks at larger sizes.
std::vector<std::size_t> lengths() {
  std::vector<std::size_t> n;
  for (std::size_t k = 0; k <= 70; ++k) n.push_back(k);
  for (std::size_t k : {127, 128, 129, 255, 256, 257, 1000, 1023, 1024, 1025, 4099}) n.push_back(k);
  return n;
}

// A word of the given kind: random, all ones, sparse, or zero.
uint64_t random_word(std::mt19937_64& rng, int kind) {
  switch (kind) {
    case 0: return rng();
    case 1: return ~uint64_t(0);
    case 2: return rng() & rng() & rng();
    default: return 0;
  }
}

// Restores the level in use when a case ends.
struct KeepLevel {
  std::string saved = pyneuron::simd_level();
  ~KeepLevel() { pyneuron::set_simd_level(saved); }
};

}  // namespace

TEST_CASE(dispatch_levels) {
  const std::vector<std::string> levels = pyneuron::available_simd_levels();
  CHECK(!levels.empty());
  if (!levels.empty()) CHECK_EQ(levels.front(), std::string("scalar"));
  // The level in use at start: PYNEURON_SIMD's where set (ctest runs this case once with
  // PYNEURON_SIMD=scalar), else the best available.
  const char* env = std::getenv("PYNEURON_SIMD");
  if (env != nullptr && *env != '\0')
    CHECK_EQ(pyneuron::simd_level(), std::string(env));
  else if (!levels.empty())
    CHECK_EQ(pyneuron::simd_level(), levels.back());
  KeepLevel keep;
  for (const std::string& level : levels_to_test()) {
    pyneuron::set_simd_level(level);
    CHECK_EQ(pyneuron::simd_level(), level);
  }
  CHECK_THROWS(pyneuron::set_simd_level("no-such-level"), std::invalid_argument);
  for (const char* level : kAllLevels)
    if (!available(level)) CHECK_THROWS(pyneuron::set_simd_level(level), std::invalid_argument);
}

// and_popcount_kernel(), and popcount_words (its a AND a), at each level, against the
// bit-by-bit loop on random inputs of many lengths, at aligned and unaligned addresses.
TEST_CASE(and_popcount_every_level) {
  KeepLevel keep;
  std::mt19937_64 rng(2024);
  for (const std::string& level : levels_to_test()) {
    pyneuron::set_simd_level(level);
    Scope level_scope("level " + level);
    std::printf("  testing SIMD level %s\n", level.c_str());
    const pyneuron::AndPopcountFn kernel = pyneuron::and_popcount_kernel();
    for (const std::size_t n : lengths()) {
      for (int kind_a = 0; kind_a < 4; ++kind_a) {
        for (int kind_b = 0; kind_b < 4; ++kind_b) {
          for (std::size_t offset = 0; offset < 3; ++offset) {  // words in front: unaligned starts
            std::vector<uint64_t> a(n + offset + 1), b(n + offset + 1);
            for (uint64_t& x : a) x = random_word(rng, kind_a);
            for (uint64_t& x : b) x = random_word(rng, kind_b);
            // Words past the end are all ones: a kernel reading beyond n would count them.
            a[n + offset] = b[n + offset] = ~uint64_t(0);
            Scope scope("n " + std::to_string(n) + ", kinds " + std::to_string(kind_a) + "/" +
                        std::to_string(kind_b) + ", offset " + std::to_string(offset));
            const uint64_t* pa = a.data() + offset;
            const uint64_t* pb = b.data() + offset;
            CHECK_EQ(kernel(pa, pb, n), naive_and_popcount(pa, pb, n));
            if (kind_b == 0) CHECK_EQ(pyneuron::popcount_words(pa, n), naive_and_popcount(pa, pa, n));
          }
        }
      }
    }
  }
}

// and_popcount_many_kernel() (one operand against many rows; the AVX-512 one takes rows in
// pairs) at each level: every row count from 0 to 9, against the bit-by-bit loop.
TEST_CASE(and_popcount_many_every_level) {
  KeepLevel keep;
  std::mt19937_64 rng(7);
  for (const std::string& level : levels_to_test()) {
    pyneuron::set_simd_level(level);
    Scope level_scope("level " + level);
    const pyneuron::AndPopcountManyFn many = pyneuron::and_popcount_many_kernel();
    for (const std::size_t n : lengths()) {
      if (n > 1100) continue;
      for (std::size_t n_rows = 0; n_rows <= 9; ++n_rows) {
        const int kind = int(rng() % 4);
        std::vector<uint64_t> a(n + 1);
        for (uint64_t& x : a) x = random_word(rng, int(rng() % 3));
        a[n] = ~uint64_t(0);
        std::vector<std::vector<uint64_t>> rows(n_rows, std::vector<uint64_t>(n + 1));
        std::vector<const uint64_t*> pointers;
        for (std::vector<uint64_t>& row : rows) {
          for (uint64_t& x : row) x = random_word(rng, kind);
          row[n] = ~uint64_t(0);
          pointers.push_back(row.data());
        }
        std::vector<uint64_t> out(n_rows + 1, 12345);  // out[n_rows] must stay untouched
        many(a.data(), pointers.data(), n_rows, n, out.data());
        Scope scope("n " + std::to_string(n) + ", rows " + std::to_string(n_rows));
        for (std::size_t j = 0; j < n_rows; ++j) CHECK_EQ(out[j], naive_and_popcount(a.data(), rows[j].data(), n));
        CHECK_EQ(out[n_rows], uint64_t(12345));
      }
    }
  }
}

// The tiled pass's micro-kernel (tile_count_kernel(), and the AVX-512 build's way of
// counting, a popcount per lane, on this build's vectors) at each level: every row count
// from 0 to 9 against column counts around the register blocks, over lengths past the
// byte counters' 31 words, all-ones words included (a byte counter kept too long would
// overflow), against the bit-by-bit loop; padding columns (read, not counted) all ones,
// and counts added to what out holds.
TEST_CASE(tile_counts_every_level) {
  KeepLevel keep;
  std::mt19937_64 rng(11);
  struct Kernel {
    std::string name;
    pyneuron::TileCountFn fn;
  };
  std::vector<Kernel> kernels{{"lanes", &pyneuron::kernels::tile_counts_lanes}};
  for (const std::string& level : levels_to_test()) {
    pyneuron::set_simd_level(level);
    kernels.push_back({level, pyneuron::tile_count_kernel()});
  }
  for (const Kernel& kernel : kernels) {
    Scope level_scope("kernel " + kernel.name);
    for (const std::size_t n : {0, 1, 2, 3, 5, 8, 30, 31, 32, 33, 62, 63, 64, 65, 100, 200}) {
      for (std::size_t n_rows = 0; n_rows <= 9; ++n_rows) {
        for (const std::size_t n_cols : {0, 1, 3, 4, 7, 8, 9, 16, 17, 23}) {
          const int kind = int(rng() % 4);
          const std::size_t stride =
              (n_cols + pyneuron::kTileStride - 1) / pyneuron::kTileStride * pyneuron::kTileStride +
              pyneuron::kTileStride * (rng() % 2);
          std::vector<std::vector<uint64_t>> rows(n_rows, std::vector<uint64_t>(n + 1));
          std::vector<const uint64_t*> pointers;
          std::vector<std::size_t> row_at, col_at;
          for (std::size_t i = 0; i < n_rows; ++i) {
            for (uint64_t& x : rows[i]) x = random_word(rng, kind == 3 ? int(rng() % 4) : kind);
            pointers.push_back(rows[i].data());
            row_at.push_back(i);
          }
          std::vector<uint64_t> columns(n * stride + 1, ~uint64_t(0));  // padding all ones
          for (std::size_t k = 0; k < n; ++k)
            for (std::size_t j = 0; j < n_cols; ++j)
              columns[k * stride + j] = random_word(rng, kind == 3 ? int(rng() % 4) : kind);
          for (std::size_t j = 0; j < n_cols; ++j) col_at.push_back((n_cols - 1 - j) * n_rows);  // any order
          std::vector<uint64_t> out(n_rows * n_cols + 1);
          for (uint64_t& x : out) x = rng() % 1000;
          std::vector<uint64_t> expected = out;
          for (std::size_t i = 0; i < n_rows; ++i)
            for (std::size_t j = 0; j < n_cols; ++j) {
              std::vector<uint64_t> column(n);
              for (std::size_t k = 0; k < n; ++k) column[k] = columns[k * stride + j];
              expected[col_at[j] + row_at[i]] += naive_and_popcount(rows[i].data(), column.data(), n);
            }
          kernel.fn(pointers.data(), row_at.data(), n_rows, columns.data(), stride, col_at.data(), n_cols, n,
                    out.data());
          Scope scope("n " + std::to_string(n) + ", rows " + std::to_string(n_rows) + ", columns " +
                      std::to_string(n_cols) + ", kind " + std::to_string(kind));
          CHECK(out == expected);
        }
      }
    }
  }
}

// The inline single-word helper the search's bookkeeping uses.
TEST_CASE(bit_count_word) {
  std::mt19937_64 rng(99);
  for (int k = 0; k < 10000; ++k) {
    const uint64_t x = k < 64 ? (uint64_t(1) << k) - 1 : rng();
    CHECK_EQ(uint64_t(pyneuron::bit_count(x)), naive_and_popcount(&x, &x, 1));
  }
  CHECK_EQ(pyneuron::bit_count(~uint64_t(0)), 64);
}

TEST_MAIN()
