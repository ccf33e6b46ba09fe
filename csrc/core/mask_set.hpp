// A set of binary masks on one grid of N images x P pixels, stored block-sparse:
// per mask, a list of the images where it is not empty, each image being either a
// *full* container or a *bitset* of P bits padded to whole 64-bit words.
#pragma once
#include <cstddef>
#include <cstdint>

namespace pyneuron {

constexpr int64_t kFullSlot = -1;  // entry slot value of a full-image container

// Largest grid: per-entry pixel counts and image ids are int32 on disk and in the
// arrays, so an image holds at most 2^31 - 1 pixels and a grid at most 2^31 - 1 images.
constexpr uint64_t kMaxGridImages = (uint64_t(1) << 31) - 1;
constexpr uint64_t kMaxImagePixels = (uint64_t(1) << 31) - 1;

struct Grid {
  uint64_t n_images = 0;
  uint64_t pixels = 0;           // pixels per image (H * W)
  uint64_t words_per_image = 0;  // ceil(pixels / 64)

  Grid() = default;
  // Throws std::invalid_argument beyond kMaxGridImages / kMaxImagePixels.
  Grid(uint64_t n, uint64_t p);
  uint64_t total_pixels() const { return n_images * pixels; }
  bool operator==(const Grid& o) const { return n_images == o.n_images && pixels == o.pixels; }
  // Mask of the valid bits in an image's last word.
  uint64_t last_word_mask() const {
    const uint64_t r = pixels % 64;
    return r == 0 ? ~uint64_t(0) : ((uint64_t(1) << r) - 1);
  }
};

// Non-owning view of the CSR arrays; the owner (Python) keeps them alive.
// Entries of mask m are [offsets[m], offsets[m+1]), sorted by image.
struct MaskSetView {
  Grid grid;
  int64_t n_masks = 0;
  const int64_t* offsets = nullptr;  // n_masks + 1
  const int32_t* images = nullptr;   // n_entries
  const int64_t* slots = nullptr;    // n_entries: kFullSlot or index of a bitset
  const int32_t* counts = nullptr;   // n_entries: set bits in that image
  const uint64_t* words = nullptr;   // n_slots * words_per_image
  int64_t n_entries = 0;
  int64_t n_slots = 0;

  const uint64_t* bitset(int64_t slot) const { return words + slot * grid.words_per_image; }

  // Throws std::invalid_argument describing the first inconsistency of the index
  // (ranges, order, container kinds vs counts, every bitset slot used exactly once);
  // reads no bitset word, and allocates nothing larger than the index (more bitsets
  // than entries is refused first).
  void validate() const;
  // Throws std::invalid_argument if a stored count differs from its bitset's
  // popcount or padding bits are set (reads every word).
  void verify_words() const;
};

}  // namespace pyneuron
