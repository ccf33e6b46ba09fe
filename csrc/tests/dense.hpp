// Test-side reference representation: a mask as one byte per pixel (image-major, row-major
// inside an image), independent of the core's words and containers, and the builder that
// turns such masks into the core's block-sparse CSR arrays (as the Python store does:
// per image an empty image has no entry, a full one a full container, else a bitset).
#pragma once
#include <cstddef>
#include <cstdint>
#include <random>
#include <vector>

#include "mask_set.hpp"
#include "sparse_mask.hpp"

namespace pyneuron_test {

using pyneuron::BinaryOp;
using pyneuron::Grid;
using pyneuron::MaskSetView;

// One byte per pixel of the grid, 0 or 1.
using Bits = std::vector<uint8_t>;

inline uint64_t count_bits(const Bits& m) {
  uint64_t n = 0;
  for (uint8_t b : m) n += b;
  return n;
}

inline uint64_t count_image(const Grid& g, const Bits& m, uint64_t image) {
  uint64_t n = 0;
  for (uint64_t k = 0; k < g.pixels; ++k) n += m[image * g.pixels + k];
  return n;
}

inline uint64_t nonempty_images(const Grid& g, const Bits& m) {
  uint64_t n = 0;
  for (uint64_t i = 0; i < g.n_images; ++i) n += count_image(g, m, i) != 0;
  return n;
}

inline Bits apply(BinaryOp op, const Bits& x, const Bits& y) {
  Bits out(x.size());
  for (std::size_t k = 0; k < x.size(); ++k) {
    switch (op) {
      case BinaryOp::Or: out[k] = x[k] | y[k]; break;
      case BinaryOp::And: out[k] = x[k] & y[k]; break;
      case BinaryOp::AndNot: out[k] = x[k] & !y[k]; break;
      case BinaryOp::OrNot: out[k] = x[k] | !y[k]; break;
    }
  }
  return out;
}

inline Bits negate(const Bits& x) {
  Bits out(x.size());
  for (std::size_t k = 0; k < x.size(); ++k) out[k] = !x[k];
  return out;
}

// The core's dense word layout of a mask: image-major, words_per_image words per image,
// pixel k of an image at bit k % 64 of its word k / 64; padding bits zero.
inline std::vector<uint64_t> pack(const Grid& g, const Bits& m) {
  std::vector<uint64_t> words(g.n_images * g.words_per_image, 0);
  for (uint64_t i = 0; i < g.n_images; ++i)
    for (uint64_t k = 0; k < g.pixels; ++k)
      if (m[i * g.pixels + k]) words[i * g.words_per_image + k / 64] |= uint64_t(1) << (k % 64);
  return words;
}

// Back from the dense word layout; also reports whether any padding bit was set.
inline Bits unpack(const Grid& g, const std::vector<uint64_t>& words, bool* padding_set = nullptr) {
  Bits m(g.n_images * g.pixels, 0);
  bool padding = false;
  for (uint64_t i = 0; i < g.n_images; ++i) {
    for (uint64_t k = 0; k < g.words_per_image * 64; ++k) {
      const bool bit = (words[i * g.words_per_image + k / 64] >> (k % 64)) & 1;
      if (k < g.pixels)
        m[i * g.pixels + k] = bit;
      else
        padding = padding || bit;
    }
  }
  if (padding_set != nullptr) *padding_set = padding;
  return m;
}

// CSR arrays of a mask set and the view on them (the view points into the vectors, whose
// buffers survive a move; no copies).
struct OwnedMaskSet {
  std::vector<int64_t> offsets{0};
  std::vector<int32_t> images;
  std::vector<int64_t> slots;
  std::vector<int32_t> counts;
  std::vector<uint64_t> words;
  MaskSetView view;

  OwnedMaskSet() = default;
  OwnedMaskSet(const OwnedMaskSet&) = delete;
  OwnedMaskSet& operator=(const OwnedMaskSet&) = delete;
  OwnedMaskSet(OwnedMaskSet&&) = default;
  OwnedMaskSet& operator=(OwnedMaskSet&&) = default;

  // Points the view at the arrays (after any change to them).
  void refresh(const Grid& g) {
    view.grid = g;
    view.n_masks = int64_t(offsets.size()) - 1;
    view.offsets = offsets.data();
    view.images = images.data();
    view.slots = slots.data();
    view.counts = counts.data();
    view.words = words.data();
    view.n_entries = int64_t(images.size());
    view.n_slots = int64_t(words.size() / g.words_per_image);
  }
};

inline OwnedMaskSet build_mask_set(const Grid& g, const std::vector<Bits>& masks) {
  OwnedMaskSet set;
  const std::size_t w = g.words_per_image;
  for (const Bits& m : masks) {
    const std::vector<uint64_t> packed = pack(g, m);
    for (uint64_t i = 0; i < g.n_images; ++i) {
      const uint64_t n = count_image(g, m, i);
      if (n == 0) continue;
      set.images.push_back(int32_t(i));
      set.counts.push_back(int32_t(n));
      if (n == g.pixels) {
        set.slots.push_back(pyneuron::kFullSlot);
      } else {
        set.slots.push_back(int64_t(set.words.size() / w));
        set.words.insert(set.words.end(), packed.begin() + std::ptrdiff_t(i * w),
                         packed.begin() + std::ptrdiff_t((i + 1) * w));
      }
    }
    set.offsets.push_back(int64_t(set.images.size()));
  }
  set.refresh(g);
  return set;
}

// A random mask whose images are a mix of the three containers: empty, full, and bitsets
// of varied density (very sparse to nearly full).
inline Bits random_mask(const Grid& g, std::mt19937_64& rng) {
  Bits m(g.n_images * g.pixels, 0);
  // Uniform in [0, 1) from the top 53 bits (the same on every standard library).
  const auto unit = [](std::mt19937_64& r) { return double(r() >> 11) * 0x1.0p-53; };
  const double densities[] = {0.02, 0.3, 0.5, 0.97};
  for (uint64_t i = 0; i < g.n_images; ++i) {
    const double kind = unit(rng);
    if (kind < 0.3) continue;  // empty
    const bool full = kind < 0.45;
    const double p = densities[rng() % 4];
    for (uint64_t k = 0; k < g.pixels; ++k) m[i * g.pixels + k] = full || unit(rng) < p;
  }
  return m;
}

}  // namespace pyneuron_test
