#include "popcount.hpp"

namespace pyneuron::kernels {

uint64_t and_popcount_scalar(const uint64_t* a, const uint64_t* b, std::size_t n) {
  uint64_t c0 = 0, c1 = 0, c2 = 0, c3 = 0;
  std::size_t i = 0;
  for (; i + 4 <= n; i += 4) {
    c0 += static_cast<uint64_t>(__builtin_popcountll(a[i] & b[i]));
    c1 += static_cast<uint64_t>(__builtin_popcountll(a[i + 1] & b[i + 1]));
    c2 += static_cast<uint64_t>(__builtin_popcountll(a[i + 2] & b[i + 2]));
    c3 += static_cast<uint64_t>(__builtin_popcountll(a[i + 3] & b[i + 3]));
  }
  for (; i < n; ++i) c0 += static_cast<uint64_t>(__builtin_popcountll(a[i] & b[i]));
  return c0 + c1 + c2 + c3;
}

void and_popcount_many_scalar(const uint64_t* a, const uint64_t* const* rows, std::size_t n_rows,
                              std::size_t n, uint64_t* out) {
  for (std::size_t j = 0; j < n_rows; ++j) out[j] = and_popcount_scalar(a, rows[j], n);
}

}  // namespace pyneuron::kernels
