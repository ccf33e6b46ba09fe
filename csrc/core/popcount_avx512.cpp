// Built with -mavx512f -mavx512vpopcntdq; only called when the CPU reports both.
#include <immintrin.h>

#include "popcount.hpp"

namespace pyneuron::kernels {

uint64_t and_popcount_avx512(const uint64_t* a, const uint64_t* b, std::size_t n) {
  __m512i acc0 = _mm512_setzero_si512();
  __m512i acc1 = _mm512_setzero_si512();
  std::size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm512_add_epi64(
        acc0, _mm512_popcnt_epi64(_mm512_and_si512(_mm512_loadu_si512(a + i), _mm512_loadu_si512(b + i))));
    acc1 = _mm512_add_epi64(acc1, _mm512_popcnt_epi64(_mm512_and_si512(
                                      _mm512_loadu_si512(a + i + 8), _mm512_loadu_si512(b + i + 8))));
  }
  for (; i + 8 <= n; i += 8) {
    acc0 = _mm512_add_epi64(
        acc0, _mm512_popcnt_epi64(_mm512_and_si512(_mm512_loadu_si512(a + i), _mm512_loadu_si512(b + i))));
  }
  if (i < n) {
    const __mmask8 tail = static_cast<__mmask8>((1u << (n - i)) - 1u);
    acc1 = _mm512_add_epi64(acc1, _mm512_popcnt_epi64(_mm512_and_si512(
                                      _mm512_maskz_loadu_epi64(tail, a + i),
                                      _mm512_maskz_loadu_epi64(tail, b + i))));
  }
  alignas(64) uint64_t lanes[8];
  _mm512_store_si512(lanes, _mm512_add_epi64(acc0, acc1));
  uint64_t total = 0;
  for (const uint64_t lane : lanes) total += lane;
  return total;
}

// Two rows at a time against `a`: `a`'s chunk is loaded once for both, and the two
// independent accumulator chains keep the popcount unit busy.
void and_popcount_many_avx512(const uint64_t* a, const uint64_t* const* rows, std::size_t n_rows,
                              std::size_t n, uint64_t* out) {
  const std::size_t full = n / 8 * 8;
  const __mmask8 tail = static_cast<__mmask8>((1u << (n - full)) - 1u);
  std::size_t j = 0;
  for (; j + 2 <= n_rows; j += 2) {
    const uint64_t* x = rows[j];
    const uint64_t* y = rows[j + 1];
    __m512i acc0 = _mm512_setzero_si512();
    __m512i acc1 = _mm512_setzero_si512();
    for (std::size_t i = 0; i < full; i += 8) {
      const __m512i va = _mm512_loadu_si512(a + i);
      acc0 = _mm512_add_epi64(acc0, _mm512_popcnt_epi64(_mm512_and_si512(va, _mm512_loadu_si512(x + i))));
      acc1 = _mm512_add_epi64(acc1, _mm512_popcnt_epi64(_mm512_and_si512(va, _mm512_loadu_si512(y + i))));
    }
    if (tail != 0) {
      const __m512i va = _mm512_maskz_loadu_epi64(tail, a + full);
      acc0 = _mm512_add_epi64(
          acc0, _mm512_popcnt_epi64(_mm512_and_si512(va, _mm512_maskz_loadu_epi64(tail, x + full))));
      acc1 = _mm512_add_epi64(
          acc1, _mm512_popcnt_epi64(_mm512_and_si512(va, _mm512_maskz_loadu_epi64(tail, y + full))));
    }
    out[j] = static_cast<uint64_t>(_mm512_reduce_add_epi64(acc0));
    out[j + 1] = static_cast<uint64_t>(_mm512_reduce_add_epi64(acc1));
  }
  if (j < n_rows) out[j] = and_popcount_avx512(a, rows[j], n);
}

}  // namespace pyneuron::kernels
