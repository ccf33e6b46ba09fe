// The register-blocked AND+popcount micro-kernel of the tiled counting pass, written once
// in portable C++ (GCC vector extensions) and compiled in each SIMD translation unit with
// its target flags (popcount_scalar.cpp: SSE2, popcount_avx2.cpp, popcount_avx512.cpp).
// Include it inside an unnamed namespace only (each translation unit keeps its own
// instantiations), after defining PYNEURON_TILE_WORDS: the 64-bit words of one vector.
//
// The columns come transposed (word k of every column of the tile, contiguous), so each
// vector lane holds one (row, column) pair: a block of MR rows x NR vectors of columns
// keeps its MR * NR * PYNEURON_TILE_WORDS counts in vector registers over the words (each
// row word broadcast once per step, each column vector loaded once per step), with no
// reduction across lanes and one store per pair.
#pragma once

constexpr std::size_t kTileWords = PYNEURON_TILE_WORDS;
typedef uint64_t TileVec __attribute__((vector_size(8 * PYNEURON_TILE_WORDS)));

inline TileVec tile_load(const uint64_t* p) {
  TileVec v;
  __builtin_memcpy(&v, p, sizeof v);  // unaligned
  return v;
}

// Set bits per lane, two ways. ByteCounts: the SWAR count of each byte (0 to 8), summed
// over at most kSteps words (a byte then holds at most 248) before lanes() adds each lane's
// bytes up.
struct ByteCounts {
  static constexpr std::size_t kSteps = 31;
  static TileVec bits(TileVec x) {
    x = x - ((x >> 1) & 0x5555555555555555ULL);
    x = (x & 0x3333333333333333ULL) + ((x >> 2) & 0x3333333333333333ULL);
    return (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0FULL;
  }
  static TileVec lanes(TileVec x) {
    x = (x & 0x00FF00FF00FF00FFULL) + ((x >> 8) & 0x00FF00FF00FF00FFULL);
    x = (x & 0x0000FFFF0000FFFFULL) + ((x >> 16) & 0x0000FFFF0000FFFFULL);
    return (x & 0x00000000FFFFFFFFULL) + (x >> 32);
  }
};
// LaneCounts: the compiler's popcount of each lane (one instruction per vector where the
// ISA has a vector popcount, as AVX-512 VPOPCNTDQ).
struct LaneCounts {
  static constexpr std::size_t kSteps = std::size_t(1) << 40;
  static TileVec bits(TileVec x) {
    // Through an array: GCC 12 then makes the lanes' popcounts one vector instruction.
    uint64_t lanes[kTileWords];
    __builtin_memcpy(lanes, &x, sizeof x);
    for (std::size_t l = 0; l < kTileWords; ++l) lanes[l] = uint64_t(__builtin_popcountll(lanes[l]));
    __builtin_memcpy(&x, lanes, sizeof x);
    return x;
  }
  static TileVec lanes(TileVec x) { return x; }
};

// Rows [0, MR) against the columns of NR vectors from column j0 on: out[col_at[j] + row_at[i]]
// for the columns j < n_cols.
template <class Count, int MR, int NR>
inline void tile_block(const uint64_t* const* rows, const std::size_t* row_at, const uint64_t* columns,
                       std::size_t stride, std::size_t j0, const std::size_t* col_at, std::size_t n_cols,
                       std::size_t n, uint64_t* out) {
  TileVec sum[MR][NR] = {};
  for (std::size_t k = 0; k < n;) {
    const std::size_t stop = n - k > Count::kSteps ? k + Count::kSteps : n;
    TileVec acc[MR][NR] = {};
    for (; k < stop; ++k) {
      TileVec y[NR];
      for (int v = 0; v < NR; ++v) y[v] = tile_load(columns + k * stride + j0 + std::size_t(v) * kTileWords);
      for (int i = 0; i < MR; ++i) {
        const uint64_t x = rows[i][k];
        for (int v = 0; v < NR; ++v) acc[i][v] += Count::bits(y[v] & x);
      }
    }
    for (int i = 0; i < MR; ++i)
      for (int v = 0; v < NR; ++v) sum[i][v] += Count::lanes(acc[i][v]);
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NR; ++v)
      for (std::size_t l = 0; l < kTileWords; ++l) {
        const std::size_t j = j0 + std::size_t(v) * kTileWords + l;
        if (j < n_cols) out[col_at[j] + row_at[i]] += sum[i][v][l];
      }
}

// MR rows against every column, NR vectors of columns at a time.
template <class Count, int MR>
inline void tile_rows(const uint64_t* const* rows, const std::size_t* row_at, const uint64_t* columns,
                      std::size_t stride, const std::size_t* col_at, std::size_t n_cols, std::size_t n,
                      uint64_t* out) {
  constexpr int NR = 2;
  std::size_t j = 0;
  for (; j + NR * kTileWords <= n_cols; j += NR * kTileWords)
    tile_block<Count, MR, NR>(rows, row_at, columns, stride, j, col_at, n_cols, n, out);
  if (j < n_cols) tile_block<Count, MR, 1>(rows, row_at, columns, stride, j, col_at, n_cols, n, out);
  if (j + kTileWords < n_cols)
    tile_block<Count, MR, 1>(rows, row_at, columns, stride, j + kTileWords, col_at, n_cols, n, out);
}

// out[col_at[j] + row_at[i]] += |rows[i] AND column j| over n words, for every i < n_rows
// and j < n_cols, where word k of column j is columns[k * stride + j] (stride: n_cols or
// more, a multiple of the vector's words; the words past n_cols are read, not counted).
template <class Count>
inline void tile_counts(const uint64_t* const* rows, const std::size_t* row_at, std::size_t n_rows,
                        const uint64_t* columns, std::size_t stride, const std::size_t* col_at, std::size_t n_cols,
                        std::size_t n, uint64_t* out) {
  constexpr int MR = 4;
  std::size_t i = 0;
  for (; i + MR <= n_rows; i += MR) tile_rows<Count, MR>(rows + i, row_at + i, columns, stride, col_at, n_cols, n, out);
  switch (n_rows - i) {
    case 3: tile_rows<Count, 3>(rows + i, row_at + i, columns, stride, col_at, n_cols, n, out); break;
    case 2: tile_rows<Count, 2>(rows + i, row_at + i, columns, stride, col_at, n_cols, n, out); break;
    case 1: tile_rows<Count, 1>(rows + i, row_at + i, columns, stride, col_at, n_cols, n, out); break;
    default: break;
  }
}
