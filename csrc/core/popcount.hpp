// AND + popcount kernels with run-time SIMD dispatch.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace pyneuron {

// Number of set bits in a[i] & b[i] over n words.
using AndPopcountFn = uint64_t (*)(const uint64_t* a, const uint64_t* b, std::size_t n);
// out[j] = number of set bits in a[i] & rows[j][i] over n words, for j < n_rows: one
// operand kept hot in L1 against many.
using AndPopcountManyFn = void (*)(const uint64_t* a, const uint64_t* const* rows, std::size_t n_rows,
                                   std::size_t n, uint64_t* out);
// out[col_at[j] + row_at[i]] += number of set bits in rows[i][k] & columns[k * stride + j]
// over k < n, for every i < n_rows and j < n_cols: the register-blocked micro-kernel of the
// tiled counting pass (tile_kernel.hpp) on transposed columns. stride is a multiple of
// kTileStride at least n_cols; the words past n_cols are read, not counted.
using TileCountFn = void (*)(const uint64_t* const* rows, const std::size_t* row_at, std::size_t n_rows,
                             const uint64_t* columns, std::size_t stride, const std::size_t* col_at,
                             std::size_t n_cols, std::size_t n, uint64_t* out);
// Words of the widest vector of the tile kernels: what their columns' stride is a multiple of.
constexpr std::size_t kTileStride = 8;

namespace kernels {
uint64_t and_popcount_scalar(const uint64_t* a, const uint64_t* b, std::size_t n);
void and_popcount_many_scalar(const uint64_t* a, const uint64_t* const* rows, std::size_t n_rows,
                              std::size_t n, uint64_t* out);
void tile_counts_scalar(const uint64_t* const* rows, const std::size_t* row_at, std::size_t n_rows,
                       const uint64_t* columns, std::size_t stride, const std::size_t* col_at, std::size_t n_cols,
                       std::size_t n, uint64_t* out);
// tile_counts_scalar with the AVX-512 build's counting (a popcount per lane), for the tests.
void tile_counts_lanes(const uint64_t* const* rows, const std::size_t* row_at, std::size_t n_rows,
                       const uint64_t* columns, std::size_t stride, const std::size_t* col_at, std::size_t n_cols,
                       std::size_t n, uint64_t* out);
#ifdef PYNEURON_X86
uint64_t and_popcount_avx2(const uint64_t* a, const uint64_t* b, std::size_t n);
void and_popcount_many_avx2(const uint64_t* a, const uint64_t* const* rows, std::size_t n_rows,
                            std::size_t n, uint64_t* out);
void tile_counts_avx2(const uint64_t* const* rows, const std::size_t* row_at, std::size_t n_rows,
                       const uint64_t* columns, std::size_t stride, const std::size_t* col_at, std::size_t n_cols,
                       std::size_t n, uint64_t* out);
uint64_t and_popcount_avx512(const uint64_t* a, const uint64_t* b, std::size_t n);
void and_popcount_many_avx512(const uint64_t* a, const uint64_t* const* rows, std::size_t n_rows,
                              std::size_t n, uint64_t* out);
void tile_counts_avx512(const uint64_t* const* rows, const std::size_t* row_at, std::size_t n_rows,
                       const uint64_t* columns, std::size_t stride, const std::size_t* col_at, std::size_t n_cols,
                       std::size_t n, uint64_t* out);
#endif
}  // namespace kernels

// SIMD levels the running CPU supports, best last ("scalar" always first).
std::vector<std::string> available_simd_levels();
// Level in use: the best available, or PYNEURON_SIMD from the environment.
std::string simd_level();
// Select a level by name; throws std::invalid_argument if unknown or unsupported.
void set_simd_level(const std::string& level);
// The selected kernels.
AndPopcountFn and_popcount_kernel();
AndPopcountManyFn and_popcount_many_kernel();
TileCountFn tile_count_kernel();

// In-cache AND+popcount throughput of one core with the selected kernels, in bytes of
// operands per second (16 bytes per pair of 64-bit words): `words` words against each
// of 64 rows of `words` words, repeated for about `seconds`. The reference the search
// benchmark compares its achieved throughput with.
double and_popcount_throughput(std::size_t words, double seconds);

// Set bits of one word, inline on the baseline ISA (where __builtin_popcountll is a
// library call): for bookkeeping in hot loops, not for counting masks.
inline int bit_count(uint64_t x) {
  x -= (x >> 1) & 0x5555555555555555ULL;
  x = (x & 0x3333333333333333ULL) + ((x >> 2) & 0x3333333333333333ULL);
  x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0FULL;
  return int((x * 0x0101010101010101ULL) >> 56);
}

// Asks for n words from `words` on to be brought into the cache (64-byte lines), ahead
// of their use: the search's scattered bitsets otherwise wait on memory.
inline void prefetch_words(const uint64_t* words, std::size_t n) {
  for (std::size_t k = 0; k < n; k += 8) __builtin_prefetch(words + k);
}

// Number of set bits in a over n words (with the selected kernel).
inline uint64_t popcount_words(const uint64_t* a, std::size_t n) { return and_popcount_kernel()(a, a, n); }

}  // namespace pyneuron
