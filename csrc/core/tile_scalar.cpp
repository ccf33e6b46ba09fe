// The tiled pass's micro-kernel (tile_kernel.hpp) for the baseline ISA (SSE2 vectors of
// two words on x86-64), with SWAR byte counts; and with a popcount per lane, the AVX-512
// build's way of counting, for the tests.
#include <cstddef>
#include <cstdint>

#include "popcount.hpp"

namespace {
#define PYNEURON_TILE_WORDS 2
#include "tile_kernel.hpp"
}  // namespace

namespace pyneuron::kernels {

void tile_counts_scalar(const uint64_t* const* rows, const std::size_t* row_at, std::size_t n_rows,
                        const uint64_t* columns, std::size_t stride, const std::size_t* col_at, std::size_t n_cols,
                        std::size_t n, uint64_t* out) {
  tile_counts<ByteCounts>(rows, row_at, n_rows, columns, stride, col_at, n_cols, n, out);
}

void tile_counts_lanes(const uint64_t* const* rows, const std::size_t* row_at, std::size_t n_rows,
                       const uint64_t* columns, std::size_t stride, const std::size_t* col_at, std::size_t n_cols,
                       std::size_t n, uint64_t* out) {
  tile_counts<LaneCounts>(rows, row_at, n_rows, columns, stride, col_at, n_cols, n, out);
}

}  // namespace pyneuron::kernels
