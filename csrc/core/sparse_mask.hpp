// One mask over the whole grid, as the list of its non-empty images with their
// containers: the working representation of formulas and unit masks during a search
// (memory and work in proportion to the images where the mask is, not to the grid).
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "mask_set.hpp"

namespace pyneuron {

enum class BinaryOp : int { Or = 0, And = 1, AndNot = 2, OrNot = 3 };

// Counts of a combined mask X and of X AND another mask, without building X.
struct CombinedCounts {
  uint64_t total = 0;        // |X|
  uint64_t images = 0;       // images where X is not empty
  uint64_t with_total = 0;   // |X AND with|
  uint64_t with_images = 0;  // images where X AND with is not empty
};

class SparseMask {
 public:
  static constexpr int32_t kEmpty = -1;
  static constexpr int32_t kFull = -2;

  explicit SparseMask(const Grid& grid);
  // A placeholder that holds no mask (no grid): only assignable.
  SparseMask() = default;
  // Mask m of a mask set.
  static SparseMask from_set(const MaskSetView& set, int64_t m);

  const Grid& grid() const { return grid_; }
  uint64_t total() const { return total_; }
  // Number of images where the mask is not empty.
  uint64_t nonempty_images() const { return images_.size(); }
  // The images where the mask is not empty, in increasing order.
  const std::vector<uint32_t>& images() const { return images_; }
  // Container and set bits of the k-th non-empty image (k < images().size()).
  int32_t slot_at(std::size_t k) const { return slots_[k]; }
  uint32_t count_at(std::size_t k) const { return counts_[k]; }
  // Mask m of a set, reading the set's bitsets in place: the set must outlive the view
  // (a copy of the set's mask where its slots do not fit the view's 32-bit index).
  static SparseMask view_of(const MaskSetView& set, int64_t m);
  // Bytes of its bitsets (owned, or read in place by a view).
  std::size_t bitset_bytes() const { return bitsets_ * grid_.words_per_image * sizeof(uint64_t); }
  const uint64_t* bitset(int32_t slot) const {
    return (viewed_ != nullptr ? viewed_ : words_.data()) + std::size_t(slot) * grid_.words_per_image;
  }

  // |this AND m| for mask m of a set; optionally the number of images where it is not empty.
  uint64_t intersect_count(const MaskSetView& set, int64_t m, uint64_t* images = nullptr) const;

  // this OP other, image by image, keeping empty and full containers as such.
  SparseMask combine(const SparseMask& other, BinaryOp op) const;
  // this OP mask m of a set, read in place.
  SparseMask combine(const MaskSetView& set, int64_t m, BinaryOp op) const;
  // Counts of this OP mask m of a set, and of that AND `with`, without building it.
  CombinedCounts combined_counts(const MaskSetView& set, int64_t m, BinaryOp op, const SparseMask& with) const;
  SparseMask complement() const;
  // Dense words, image-major, words_per_image per image (padding bits zero).
  std::vector<uint64_t> to_words() const;

 private:
  void set_image(uint32_t image, const uint64_t* bits, uint32_t count);
  void reserve(std::size_t images);
  // The position of `image` among the non-empty images, or -1; `cursor` (a position)
  // only moves forward, so increasing images cost a walk of the list in all.
  std::ptrdiff_t seek(std::size_t& cursor, uint32_t image) const;
  void set_full(uint32_t image);
  // this OP other image by image, each non-empty result image to sink.full(image) or
  // sink.partial(image, bits, count), visiting only the images where the result can be
  // non-empty. `other`: the other mask's non-empty images in increasing order,
  // other.image(k), other.bits(k) (its bitset there, or the full marker) and
  // other.count(k) (its set bits there) for k < other.size().
  template <class Other, class Sink>
  void combine_into(const Other& other, BinaryOp op, Sink& sink) const;
  // `other_bitsets`, `other_nonempty`: the other mask's partial and non-empty images (to
  // size the result once).
  template <class Other>
  SparseMask combine_with(const Other& other, std::size_t other_bitsets, std::size_t other_nonempty,
                          BinaryOp op) const;

  Grid grid_;
  std::vector<uint64_t> words_;
  const uint64_t* viewed_ = nullptr;  // a view's bitsets (then words_ is empty)
  std::size_t bitsets_ = 0;           // partial images
  uint64_t total_ = 0;
  std::vector<uint32_t> images_;      // non-empty images, increasing
  std::vector<int32_t> slots_;        // per non-empty image: kFull or index of a bitset
  std::vector<uint32_t> counts_;      // per non-empty image: set bits
};

}  // namespace pyneuron
