// The tiled pass's micro-kernel (tile_kernel.hpp) built with -mavx512f -mavx512vpopcntdq
// (vectors of eight words, the compiler's popcount per lane: one VPOPCNTQ); only called
// when the CPU reports both.
#include <cstddef>
#include <cstdint>

#include "popcount.hpp"

namespace {
#define PYNEURON_TILE_WORDS 8
#include "tile_kernel.hpp"
}  // namespace

namespace pyneuron::kernels {

void tile_counts_avx512(const uint64_t* const* rows, const std::size_t* row_at, std::size_t n_rows,
                        const uint64_t* columns, std::size_t stride, const std::size_t* col_at, std::size_t n_cols,
                        std::size_t n, uint64_t* out) {
  tile_counts<LaneCounts>(rows, row_at, n_rows, columns, stride, col_at, n_cols, n, out);
}

}  // namespace pyneuron::kernels
