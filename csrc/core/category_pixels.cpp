#include "category_pixels.hpp"

#include <algorithm>
#include <mutex>
#include <stdexcept>
#include <vector>

#include "thread_pool.hpp"

namespace pyneuron {

namespace {

bool words_meet(const uint64_t* a, const uint64_t* b, uint32_t n) {
  for (uint32_t i = 0; i < n; ++i)
    if (a[i] & b[i]) return true;
  return false;
}

constexpr int8_t kEmpty = 0, kPartial = 1, kFull = 2;

}  // namespace

void category_unit_pixels(const MaskSetView& units, int64_t unit_begin, int64_t unit_end,
                          const MaskSetView& concepts, const int32_t* category,
                          int32_t n_categories, int64_t* out) {
  if (!(units.grid == concepts.grid)) throw std::invalid_argument("units and concepts are on different grids");
  if (unit_begin < 0 || unit_end > units.n_masks || unit_begin > unit_end)
    throw std::invalid_argument("unit range out of bounds");
  if (n_categories < 1) throw std::invalid_argument("need at least one category");
  for (int64_t c = 0; c < concepts.n_masks; ++c)
    if (category[c] < 0 || category[c] >= n_categories) throw std::invalid_argument("category code out of range");
  const int64_t n_units = unit_end - unit_begin;
  const int64_t K = n_categories;
  std::fill(out, out + n_units * K, int64_t(0));
  if (n_units == 0) return;

  // The concept entries of every image (a transpose of the concepts' CSR index).
  const uint32_t n_images = concepts.grid.n_images;
  std::vector<int64_t> image_offsets(std::size_t(n_images) + 1, 0);
  for (int64_t e = 0; e < concepts.n_entries; ++e) ++image_offsets[std::size_t(concepts.images[e]) + 1];
  for (uint32_t i = 0; i < n_images; ++i) image_offsets[i + 1] += image_offsets[i];
  std::vector<int64_t> by_image(static_cast<std::size_t>(concepts.n_entries));
  std::vector<int32_t> by_image_category(static_cast<std::size_t>(concepts.n_entries));
  {
    std::vector<int64_t> fill(image_offsets.begin(), image_offsets.end() - 1);
    for (int64_t c = 0; c < concepts.n_masks; ++c)
      for (int64_t e = concepts.offsets[c]; e < concepts.offsets[c + 1]; ++e) {
        const int64_t pos = fill[std::size_t(concepts.images[e])]++;
        by_image[std::size_t(pos)] = e;
        by_image_category[std::size_t(pos)] = category[c];
      }
  }

  const uint32_t wpi = concepts.grid.words_per_image;
  constexpr int64_t kImagesPerTask = 256;
  const int64_t n_tasks = (int64_t(n_images) + kImagesPerTask - 1) / kImagesPerTask;
  std::mutex merge;
  parallel_for(n_tasks, [&](int64_t task) {
    const int64_t first = task * kImagesPerTask;
    const int64_t last = std::min<int64_t>(int64_t(n_images), first + kImagesPerTask);
    std::vector<int64_t> acc(std::size_t(n_units * K), 0);
    std::vector<int64_t> cursor(static_cast<std::size_t>(n_units));  // each unit's first entry at or after `image`
    for (int64_t u = 0; u < n_units; ++u) {
      const int32_t* begin = units.images + units.offsets[unit_begin + u];
      const int32_t* end = units.images + units.offsets[unit_begin + u + 1];
      cursor[std::size_t(u)] = std::lower_bound(begin, end, int32_t(first)) - units.images;
    }
    std::vector<int8_t> state(static_cast<std::size_t>(K));
    std::vector<uint64_t> unions(std::size_t(K) * wpi);
    std::vector<int64_t> hits;  // (unit, entry) pairs of this image
    for (int64_t image = first; image < last; ++image) {
      hits.clear();
      for (int64_t u = 0; u < n_units; ++u) {
        const int64_t e = cursor[std::size_t(u)];
        if (e < units.offsets[unit_begin + u + 1] && units.images[e] == image) {
          hits.push_back(u);
          hits.push_back(e);
          ++cursor[std::size_t(u)];
        }
      }
      if (hits.empty()) continue;
      // Per category, the union of its concepts in this image.
      std::fill(state.begin(), state.end(), kEmpty);
      for (int64_t p = image_offsets[std::size_t(image)]; p < image_offsets[std::size_t(image) + 1]; ++p) {
        const int64_t e = by_image[std::size_t(p)];
        const int32_t k = by_image_category[std::size_t(p)];
        int8_t& s = state[std::size_t(k)];
        if (s == kFull) continue;
        uint64_t* words = &unions[std::size_t(k) * wpi];
        if (concepts.slots[e] == kFullSlot) {
          s = kFull;
          continue;
        }
        const uint64_t* bits = concepts.bitset(concepts.slots[e]);
        if (s == kEmpty) {
          std::copy(bits, bits + wpi, words);
          s = kPartial;
        } else {
          for (uint32_t i = 0; i < wpi; ++i) words[i] |= bits[i];
        }
      }
      for (std::size_t h = 0; h < hits.size(); h += 2) {
        const int64_t u = hits[h], e = hits[h + 1];
        const bool unit_full = units.slots[e] == kFullSlot;
        const uint64_t* unit_bits = unit_full ? nullptr : units.bitset(units.slots[e]);
        for (int64_t k = 0; k < K; ++k) {
          const int8_t s = state[std::size_t(k)];
          if (s == kEmpty) continue;
          if (s == kFull || unit_full || words_meet(unit_bits, &unions[std::size_t(k) * wpi], wpi))
            acc[std::size_t(u * K + k)] += units.counts[e];
        }
      }
    }
    std::lock_guard<std::mutex> lock(merge);
    for (std::size_t i = 0; i < acc.size(); ++i) out[i] += acc[i];
  });
}

}  // namespace pyneuron
