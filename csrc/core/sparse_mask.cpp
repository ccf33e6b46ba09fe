#include "sparse_mask.hpp"

#include <algorithm>
#include <climits>
#include <cstring>
#include <stdexcept>

#include "popcount.hpp"

namespace pyneuron {

SparseMask::SparseMask(const Grid& grid) : grid_(grid) {}

void SparseMask::set_full(uint32_t image) {
  images_.push_back(image);
  slots_.push_back(kFull);
  counts_.push_back(uint32_t(grid_.pixels));
  total_ += grid_.pixels;
}

void SparseMask::set_image(uint32_t image, const uint64_t* bits, uint32_t count) {
  if (count == 0) return;
  if (count == grid_.pixels) return set_full(image);
  const std::size_t w = grid_.words_per_image;
  images_.push_back(image);
  slots_.push_back(static_cast<int32_t>(words_.size() / w));
  counts_.push_back(count);
  words_.insert(words_.end(), bits, bits + w);
  total_ += count;
  ++bitsets_;
}

SparseMask SparseMask::from_set(const MaskSetView& set, int64_t m) {
  SparseMask mask(set.grid);
  mask.reserve(std::size_t(set.offsets[m + 1] - set.offsets[m]));
  for (int64_t e = set.offsets[m]; e < set.offsets[m + 1]; ++e) {
    const uint32_t image = static_cast<uint32_t>(set.images[e]);
    if (set.slots[e] == kFullSlot)
      mask.set_full(image);
    else
      mask.set_image(image, set.bitset(set.slots[e]), static_cast<uint32_t>(set.counts[e]));
  }
  return mask;
}

SparseMask SparseMask::view_of(const MaskSetView& set, int64_t m) {
  if (set.n_slots > int64_t(INT32_MAX)) return from_set(set, m);
  SparseMask mask(set.grid);
  mask.viewed_ = set.words;
  mask.reserve(std::size_t(set.offsets[m + 1] - set.offsets[m]));
  for (int64_t e = set.offsets[m]; e < set.offsets[m + 1]; ++e) {
    const uint32_t image = static_cast<uint32_t>(set.images[e]);
    if (set.slots[e] == kFullSlot) {
      mask.set_full(image);
    } else {
      mask.images_.push_back(image);
      mask.slots_.push_back(static_cast<int32_t>(set.slots[e]));
      mask.counts_.push_back(static_cast<uint32_t>(set.counts[e]));
      mask.total_ += uint64_t(set.counts[e]);
      ++mask.bitsets_;
    }
  }
  return mask;
}

uint64_t SparseMask::intersect_count(const MaskSetView& set, int64_t m, uint64_t* images) const {
  const AndPopcountFn and_popcount = and_popcount_kernel();
  const std::size_t w = grid_.words_per_image;
  uint64_t total = 0, hit_images = 0;
  // The images of both, walking the two increasing lists (jumping over a gap in either).
  const int32_t* theirs = set.images;
  std::size_t k = 0;
  int64_t e = set.offsets[m];
  const int64_t last = set.offsets[m + 1];
  while (k < images_.size() && e < last) {
    const uint32_t mine_image = images_[k], their_image = uint32_t(theirs[e]);
    if (mine_image < their_image) {
      k = std::size_t(std::lower_bound(images_.begin() + std::ptrdiff_t(k), images_.end(), their_image) - images_.begin());
      continue;
    }
    if (their_image < mine_image) {
      e = std::lower_bound(theirs + e, theirs + last, int32_t(mine_image)) - theirs;
      continue;
    }
    const int32_t mine = slots_[k];
    uint64_t c;
    if (mine == kFull)
      c = static_cast<uint64_t>(set.counts[e]);
    else if (set.slots[e] == kFullSlot)
      c = counts_[k];
    else
      c = and_popcount(bitset(mine), set.bitset(set.slots[e]), w);
    total += c;
    hit_images += c != 0;
    ++k;
    ++e;
  }
  if (images != nullptr) *images = hit_images;
  return total;
}

namespace {
// Markers of empty and full containers among the bitset pointers combine_with reads.
const uint64_t* const kEmptyBits = nullptr;
const uint64_t kFullMarker = 0;
const uint64_t* const kFullBits = &kFullMarker;
}  // namespace

template <class Other, class Sink>
void SparseMask::combine_into(const Other& other, BinaryOp op, Sink& sink) const {
  const std::size_t w = grid_.words_per_image;
  const uint64_t last_mask = grid_.last_word_mask();
  std::vector<uint64_t> ones(w, ~uint64_t(0));
  ones[w - 1] = last_mask;
  const std::vector<uint64_t> zeros(w, 0);
  std::vector<uint64_t> out(w);
  // The images to visit, in increasing order: every image for OR NOT (a result image is
  // full where `other` is empty), those of both for AND, else those of either. Listed
  // first, so that their bitsets can be fetched from memory a few images ahead.
  struct Visit {
    uint32_t image;
    int32_t a;            // this mask's slot there (or kEmpty / kFull)
    uint32_t a_count;
    const uint64_t* y;    // the other's bitset there (or its empty / full marker)
    uint64_t y_count;
  };
  std::vector<Visit> visits;
  const uint32_t n_images = uint32_t(grid_.n_images);
  const std::size_t n_mine = images_.size(), n_other = other.size();
  visits.reserve(op == BinaryOp::OrNot ? n_images : op == BinaryOp::And ? std::min(n_mine, n_other) : n_mine + n_other);
  std::size_t i = 0, j = 0;  // cursors into images_ and other's images
  for (uint32_t image = 0;; ++image) {
    const uint32_t next_mine = i < n_mine ? images_[i] : n_images;
    const uint32_t next_other = j < n_other ? other.image(j) : n_images;
    if (op != BinaryOp::OrNot) image = std::min(next_mine, next_other);
    if (image >= n_images) break;
    if (op != BinaryOp::And || next_mine == next_other)
      visits.push_back({image, next_mine == image ? slots_[i] : kEmpty, next_mine == image ? counts_[i] : 0,
                        next_other == image ? other.bits(j) : kEmptyBits, next_other == image ? other.count(j) : 0});
    i += next_mine == image;
    j += next_other == image;
  }
  constexpr std::size_t kAhead = 4;
  for (std::size_t v = 0; v < visits.size(); ++v) {
    if (v + kAhead < visits.size()) {
      const Visit& ahead = visits[v + kAhead];
      if (ahead.a >= 0) prefetch_words(bitset(ahead.a), w);
      if (ahead.y != kEmptyBits && ahead.y != kFullBits) prefetch_words(ahead.y, w);
      sink.prefetch(ahead.image);
    }
    const uint32_t image = visits[v].image;
    const int32_t a = visits[v].a;
    const uint32_t a_count = visits[v].a_count;
    const uint64_t* y = visits[v].y;
    const uint64_t y_count = visits[v].y_count;
    const bool b_empty = y == kEmptyBits, b_full = y == kFullBits;
    // Shortcuts on empty and full containers; bitset work only where both are partial.
    switch (op) {
      case BinaryOp::And:
        if (a == kEmpty || b_empty) continue;
        if (a == kFull && b_full) { sink.full(image); continue; }
        if (a == kFull) { sink.partial(image, y, y_count); continue; }
        if (b_full) { sink.partial(image, bitset(a), a_count); continue; }
        break;
      case BinaryOp::Or:
        if (a == kFull || b_full) { sink.full(image); continue; }
        if (a == kEmpty && b_empty) continue;
        if (a == kEmpty) { sink.partial(image, y, y_count); continue; }
        if (b_empty) { sink.partial(image, bitset(a), a_count); continue; }
        break;
      case BinaryOp::AndNot:
        if (a == kEmpty || b_full) continue;
        if (a == kFull && b_empty) { sink.full(image); continue; }
        if (b_empty) { sink.partial(image, bitset(a), a_count); continue; }
        break;
      case BinaryOp::OrNot:
        if (a == kFull || b_empty) { sink.full(image); continue; }
        if (a == kEmpty && b_full) continue;
        break;
    }
    const uint64_t* x = a == kEmpty ? zeros.data() : a == kFull ? ones.data() : bitset(a);
    if (b_empty) y = zeros.data();
    if (b_full) y = ones.data();
    switch (op) {
      case BinaryOp::And: for (std::size_t k = 0; k < w; ++k) out[k] = x[k] & y[k]; break;
      case BinaryOp::Or: for (std::size_t k = 0; k < w; ++k) out[k] = x[k] | y[k]; break;
      case BinaryOp::AndNot: for (std::size_t k = 0; k < w; ++k) out[k] = x[k] & ~y[k]; break;
      case BinaryOp::OrNot: for (std::size_t k = 0; k < w; ++k) out[k] = x[k] | ~y[k]; break;
    }
    out[w - 1] &= last_mask;
    const uint64_t count = popcount_words(out.data(), w);
    if (count != 0) sink.partial(image, out.data(), count);
  }
}

template <class Other>
SparseMask SparseMask::combine_with(const Other& other, std::size_t other_bitsets, std::size_t other_nonempty,
                                    BinaryOp op) const {
  struct Store {
    SparseMask& result;
    void full(uint32_t image) { result.set_full(image); }
    void partial(uint32_t image, const uint64_t* bits, uint64_t count) {
      result.set_image(image, bits, static_cast<uint32_t>(count));
    }
    void prefetch(uint32_t) const {}
  };
  SparseMask result(grid_);
  // A partial image of the result is partial in one of the two at least (and not empty in
  // either, for AND).
  const std::size_t w = grid_.words_per_image;
  std::size_t partial = std::min<std::size_t>(bitsets_ + other_bitsets, grid_.n_images);
  if (op == BinaryOp::And) partial = std::min<std::size_t>({partial, images_.size(), other_nonempty});
  result.words_.reserve(partial * w);
  Store sink{result};
  combine_into(other, op, sink);
  return result;
}

SparseMask SparseMask::combine(const SparseMask& other, BinaryOp op) const {
  if (!(grid_ == other.grid_)) throw std::invalid_argument("masks on different grids");
  struct Images {
    const SparseMask& mask;
    std::size_t size() const { return mask.images_.size(); }
    uint32_t image(std::size_t k) const { return mask.images_[k]; }
    const uint64_t* bits(std::size_t k) const {
      const int32_t slot = mask.slots_[k];
      return slot == kFull ? kFullBits : mask.bitset(slot);
    }
    uint64_t count(std::size_t k) const { return mask.counts_[k]; }
  };
  return combine_with(Images{other}, other.bitsets_, other.images_.size(), op);
}

namespace {
// Mask m of a set as combine_into reads it: its entries.
struct SetMaskImages {
  const MaskSetView& set;
  int64_t first, last;  // its entries
  std::size_t bitsets = 0;
  SetMaskImages(const MaskSetView& s, int64_t m) : set(s), first(s.offsets[m]), last(s.offsets[m + 1]) {
    for (int64_t e = first; e < last; ++e) bitsets += set.slots[e] != kFullSlot;
  }
  std::size_t size() const { return std::size_t(last - first); }
  uint32_t image(std::size_t k) const { return uint32_t(set.images[first + int64_t(k)]); }
  const uint64_t* bits(std::size_t k) const {
    const int64_t slot = set.slots[first + int64_t(k)];
    return slot == kFullSlot ? kFullBits : set.bitset(slot);
  }
  uint64_t count(std::size_t k) const { return uint64_t(set.counts[first + int64_t(k)]); }
};
}  // namespace

SparseMask SparseMask::combine(const MaskSetView& set, int64_t m, BinaryOp op) const {
  if (!(grid_ == set.grid)) throw std::invalid_argument("masks on different grids");
  const SetMaskImages other(set, m);
  return combine_with(other, other.bitsets, other.size(), op);
}

CombinedCounts SparseMask::combined_counts(const MaskSetView& set, int64_t m, BinaryOp op,
                                           const SparseMask& with) const {
  if (!(grid_ == set.grid) || !(grid_ == with.grid_)) throw std::invalid_argument("masks on different grids");
  struct Count {
    const SparseMask& with;
    std::size_t w;
    AndPopcountFn and_popcount = and_popcount_kernel();
    CombinedCounts n{};
    void add(uint64_t count, uint64_t with_count) {
      n.total += count;
      ++n.images;
      n.with_total += with_count;
      n.with_images += with_count != 0;
    }
    // Cursors into with's images: images come in increasing order (and the prefetched
    // ones too).
    std::size_t at = 0, ahead = 0;
    void full(uint32_t image) {
      const std::ptrdiff_t k = with.seek(at, image);
      add(with.grid_.pixels, k < 0 ? 0 : with.counts_[std::size_t(k)]);
    }
    void prefetch(uint32_t image) {
      const std::ptrdiff_t k = with.seek(ahead, image);
      if (k >= 0 && with.slots_[std::size_t(k)] >= 0) prefetch_words(with.bitset(with.slots_[std::size_t(k)]), w);
    }
    void partial(uint32_t image, const uint64_t* bits, uint64_t count) {
      const std::ptrdiff_t k = with.seek(at, image);
      const int32_t slot = k < 0 ? kEmpty : with.slots_[std::size_t(k)];
      add(count, slot == kEmpty ? 0 : slot == kFull ? count : and_popcount(bits, with.bitset(slot), w));
    }
  };
  const SetMaskImages other(set, m);
  Count sink{with, grid_.words_per_image};
  combine_into(other, op, sink);
  return sink.n;
}

std::ptrdiff_t SparseMask::seek(std::size_t& cursor, uint32_t image) const {
  if (cursor < images_.size() && images_[cursor] < image)
    cursor = std::size_t(std::lower_bound(images_.begin() + std::ptrdiff_t(cursor), images_.end(), image) - images_.begin());
  return cursor < images_.size() && images_[cursor] == image ? std::ptrdiff_t(cursor) : -1;
}

void SparseMask::reserve(std::size_t n) {
  images_.reserve(n);
  slots_.reserve(n);
  counts_.reserve(n);
}

SparseMask SparseMask::complement() const {
  SparseMask everything(grid_);
  everything.reserve(grid_.n_images);
  for (uint32_t image = 0; image < grid_.n_images; ++image) everything.set_full(image);
  return everything.combine(*this, BinaryOp::AndNot);
}

std::vector<uint64_t> SparseMask::to_words() const {
  const std::size_t w = grid_.words_per_image;
  std::vector<uint64_t> dense(std::size_t(grid_.n_images) * w, 0);
  for (std::size_t k = 0; k < images_.size(); ++k) {
    uint64_t* dst = dense.data() + std::size_t(images_[k]) * w;
    if (slots_[k] == kFull) {
      std::fill(dst, dst + w, ~uint64_t(0));
      dst[w - 1] = grid_.last_word_mask();
    } else {
      std::memcpy(dst, bitset(slots_[k]), w * sizeof(uint64_t));
    }
  }
  return dense;
}

}  // namespace pyneuron
