// Built with -mavx2 -mpopcnt; only called when the CPU reports AVX2.
#include <immintrin.h>

#include "popcount.hpp"

namespace pyneuron::kernels {

namespace {
// Mula's nibble-lookup popcount of each byte, summed per 64-bit lane.
inline __m256i popcount_lanes(__m256i v) {
  const __m256i lookup =
      _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1,
                       2, 2, 3, 2, 3, 3, 4);
  const __m256i low_mask = _mm256_set1_epi8(0x0f);
  const __m256i lo = _mm256_and_si256(v, low_mask);
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low_mask);
  const __m256i bytes =
      _mm256_add_epi8(_mm256_shuffle_epi8(lookup, lo), _mm256_shuffle_epi8(lookup, hi));
  return _mm256_sad_epu8(bytes, _mm256_setzero_si256());
}
}  // namespace

uint64_t and_popcount_avx2(const uint64_t* a, const uint64_t* b, std::size_t n) {
  __m256i acc = _mm256_setzero_si256();
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i x0 = _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + i)),
                                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + i)));
    const __m256i x1 =
        _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + i + 4)),
                         _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + i + 4)));
    acc = _mm256_add_epi64(acc, _mm256_add_epi64(popcount_lanes(x0), popcount_lanes(x1)));
  }
  for (; i + 4 <= n; i += 4) {
    const __m256i x = _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + i)),
                                       _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + i)));
    acc = _mm256_add_epi64(acc, popcount_lanes(x));
  }
  uint64_t total = static_cast<uint64_t>(_mm256_extract_epi64(acc, 0)) +
                   static_cast<uint64_t>(_mm256_extract_epi64(acc, 1)) +
                   static_cast<uint64_t>(_mm256_extract_epi64(acc, 2)) +
                   static_cast<uint64_t>(_mm256_extract_epi64(acc, 3));
  for (; i < n; ++i) total += static_cast<uint64_t>(_mm_popcnt_u64(a[i] & b[i]));
  return total;
}

void and_popcount_many_avx2(const uint64_t* a, const uint64_t* const* rows, std::size_t n_rows,
                            std::size_t n, uint64_t* out) {
  for (std::size_t j = 0; j < n_rows; ++j) out[j] = and_popcount_avx2(a, rows[j], n);
}

}  // namespace pyneuron::kernels
