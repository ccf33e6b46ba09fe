// AND + popcount kernels with run-time SIMD dispatch.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace pyneuron {

// Number of set bits in a[i] & b[i] over n words.
using AndPopcountFn = uint64_t (*)(const uint64_t* a, const uint64_t* b, std::size_t n);

namespace kernels {
uint64_t and_popcount_scalar(const uint64_t* a, const uint64_t* b, std::size_t n);
#ifdef PYNEURON_X86
uint64_t and_popcount_avx2(const uint64_t* a, const uint64_t* b, std::size_t n);
uint64_t and_popcount_avx512(const uint64_t* a, const uint64_t* b, std::size_t n);
#endif
}  // namespace kernels

// SIMD levels the running CPU supports, best last ("scalar" always first).
std::vector<std::string> available_simd_levels();
// Level in use: the best available, or PYNEURON_SIMD from the environment.
std::string simd_level();
// Select a level by name; throws std::invalid_argument if unknown or unsupported.
void set_simd_level(const std::string& level);
// The selected kernel.
AndPopcountFn and_popcount_kernel();

// Number of set bits in a over n words (with the selected kernel).
inline uint64_t popcount_words(const uint64_t* a, std::size_t n) { return and_popcount_kernel()(a, a, n); }

}  // namespace pyneuron
