#include "mask_set.hpp"

#include <stdexcept>
#include <string>
#include <vector>

#include "popcount.hpp"

namespace pyneuron {

namespace {
[[noreturn]] void fail(const std::string& what) { throw std::invalid_argument("inconsistent mask set: " + what); }
}  // namespace

Grid::Grid(uint64_t n, uint64_t p) : n_images(n), pixels(p), words_per_image((p + 63) / 64) {
  if (n > kMaxGridImages)
    throw std::invalid_argument("a grid holds at most 2**31 - 1 images, got " + std::to_string(n));
  if (p > kMaxImagePixels)
    throw std::invalid_argument("an image holds at most 2**31 - 1 pixels (height * width), got " +
                                std::to_string(p));
}

void MaskSetView::validate() const {
  if (grid.pixels == 0) fail("grid has zero pixels per image");
  if (n_masks < 0 || n_entries < 0 || n_slots < 0) fail("negative sizes");
  if (offsets[0] != 0) fail("offsets must start at 0");
  if (offsets[n_masks] != n_entries) fail("last offset does not equal the number of entries");
  // Every bitset belongs to exactly one entry: checked before sizing anything by n_slots
  // (a words array claimed far larger than the index, e.g. an edited store).
  if (n_slots > n_entries)
    fail("the words hold " + std::to_string(n_slots) + " bitsets but the index has only " +
         std::to_string(n_entries) + " entries (each bitset belongs to one entry)");
  std::vector<char> slot_used(std::size_t(n_slots), 0);
  for (int64_t m = 0; m < n_masks; ++m) {
    const int64_t begin = offsets[m], end = offsets[m + 1];
    if (end < begin || end > n_entries) fail("offsets of mask " + std::to_string(m) + " are not increasing");
    int64_t previous = -1;
    for (int64_t e = begin; e < end; ++e) {
      const int64_t image = images[e];
      if (image <= previous || image >= int64_t(grid.n_images))
        fail("mask " + std::to_string(m) + ": image ids must be increasing and below " +
             std::to_string(grid.n_images));
      previous = image;
      const int64_t slot = slots[e];
      const int64_t count = counts[e];
      if (slot == kFullSlot) {
        if (count != int64_t(grid.pixels)) fail("full container with a count other than the image size");
      } else {
        if (slot < 0 || slot >= n_slots) fail("bitset slot out of range");
        if (slot_used[std::size_t(slot)]) fail("bitset slot " + std::to_string(slot) + " used twice");
        slot_used[std::size_t(slot)] = 1;
        // A bitset holds 1 .. pixels - 1 set pixels: empty images have no entry and
        // full ones are full containers.
        if (count <= 0 || count >= int64_t(grid.pixels)) fail("bitset container with an impossible count");
      }
    }
  }
  for (int64_t slot = 0; slot < n_slots; ++slot)
    if (!slot_used[std::size_t(slot)]) fail("bitset slot " + std::to_string(slot) + " is not used by any entry");
}

void MaskSetView::verify_words() const {
  const uint64_t last_mask = grid.last_word_mask();
  const std::size_t w = grid.words_per_image;
  for (int64_t e = 0; e < n_entries; ++e) {
    if (slots[e] == kFullSlot) continue;
    const uint64_t* bits = bitset(slots[e]);
    if ((bits[w - 1] & ~last_mask) != 0) fail("padding bits set in a bitset container");
    if (popcount_words(bits, w) != uint64_t(counts[e])) fail("stored pixel count differs from the bitset");
  }
}

}  // namespace pyneuron
