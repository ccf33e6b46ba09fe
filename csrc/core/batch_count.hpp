// Batched AND+popcount of many rows (SparseMasks) against every mask of a set: the
// counting step of the search as a binary AND-popcount "GEMM". The set is walked image by
// image, so each of its bitsets is read once per call while the rows' bitsets of that
// image (a few KiB to a few hundred KiB) stay in L1/L2.
#pragma once
#include <cstdint>
#include <utility>
#include <vector>

#include "mask_set.hpp"
#include "popcount.hpp"
#include "sparse_mask.hpp"

namespace pyneuron {

// The entries of a mask set by image: for each image, its (mask, slot, count) entries
// in increasing mask order.
class ImageMajorIndex {
 public:
  struct Entry {
    int32_t mask;
    int32_t count;  // set bits in this image
    int64_t slot;   // kFullSlot or index of a bitset
  };
  explicit ImageMajorIndex(const MaskSetView& set);
  const Entry* begin(uint32_t image) const { return entries_.data() + offsets_[image]; }
  const Entry* end(uint32_t image) const { return entries_.data() + offsets_[image + 1]; }

 private:
  std::vector<int64_t> offsets_;
  std::vector<Entry> entries_;
};

// Selected (row, column) pairs: bit r of word c * row_words() + r / 64. Once all are
// added, number() numbers them column by column (rows in increasing order), the order
// of their counts.
class PairSet {
 public:
  PairSet(int64_t n_rows, int64_t n_columns)
      : row_words_((n_rows + 63) / 64), bits_(std::size_t(row_words_) * std::size_t(n_columns), 0) {}
  int64_t row_words() const { return row_words_; }
  void add(int64_t row, int64_t column) {
    bits_[std::size_t(column) * row_words_ + std::size_t(row) / 64] |= uint64_t(1) << (row % 64);
  }
  const uint64_t* column(int64_t c) const { return bits_.data() + std::size_t(c) * row_words_; }
  void number() {
    first_.assign(bits_.size() + 1, 0);
    for (std::size_t k = 0; k < bits_.size(); ++k) first_[k + 1] = first_[k] + bit_count(bits_[k]);
  }
  int64_t size() const { return first_.back(); }
  // Number of the first selected pair of word k (k = column * row_words() + row / 64);
  // numbered ones only.
  int64_t first(std::size_t k) const { return first_[k]; }
  // Number of the selected pair (row, column); numbered ones only.
  int64_t index(int64_t row, int64_t column) const {
    const std::size_t k = std::size_t(column) * row_words_ + std::size_t(row) / 64;
    return first_[k] + bit_count(bits_[k] & ((uint64_t(1) << (row % 64)) - 1));
  }

 private:
  int64_t row_words_;
  std::vector<uint64_t> bits_;
  std::vector<int64_t> first_;  // [k]: number of the first pair of word k
};

struct BatchCounts {
  // Selected pairs: counts[pairs.index(r, c)] = |row r AND column c|; all pairs (no
  // selection): counts[c * n_rows + r].
  std::vector<uint64_t> counts;
  std::vector<uint64_t> words;  // per row: 64-bit word pairs AND-popcounted for it
};

// How a counting pass goes through a range of columns (PairCounter::count).
enum class CountPath {
  // Per (image, column): the selected rows present there, each counted on its own words
  // or all against the column in one call; pays per selected pair and image.
  Sparse,
  // Per image: the rows present there, in groups of rows over nearby words, against all
  // the wanted columns present there with the register-blocked micro-kernel (every pair,
  // selected or not) into a dense accumulator, mapped to the selected pairs once at the
  // end; pays per present pair and image, with no bookkeeping per pair.
  Tiled,
  // Per image, the path of the lower estimated cost (from its rows, their words and the
  // share of selected pairs in the range of columns).
  Auto,
};

// Counts of fixed rows against the columns of a mask set, for any number of pair selections.
class PairCounter {
 public:
  // The rows, the columns and the index must outlive the counter.
  PairCounter(const std::vector<const SparseMask*>& rows, const MaskSetView& columns, const ImageMajorIndex& index);
  // |rows[r] AND column c| for the selected pairs (numbered; all pairs when `pairs` is
  // null), spread over the thread pool by ranges of columns.
  BatchCounts count(const PairSet* pairs, CountPath path = CountPath::Auto) const;

 private:
  const std::vector<const SparseMask*>& rows_;
  const MaskSetView& columns_;
  const ImageMajorIndex& index_;
  // A row not empty in an image: its bitset there trimmed to the words from its first to its
  // last non-zero one (unit masks and F AND A cover a few words of an image), or null
  // where it is full (then all the image's words).
  struct RowImage {
    const uint64_t* bits;  // from word `first`
    uint32_t count;
    uint32_t first;
    uint32_t length;
    int32_t row;
  };
  // Rows of one image (consecutive non-full records) read together over the words
  // [first, first + length) by the tiled path.
  struct RowGroup {
    int64_t record;  // first record in row_images_
    uint32_t size;   // records
    uint32_t first, length;
  };
  static constexpr uint32_t kGroupRows = 8;
  static constexpr uint64_t kTileMinRows = 8;
  std::vector<int64_t> group_offsets_;  // per image: its groups in groups_ ([i], [i + 1])
  std::vector<RowGroup> groups_;
  // Per image, what counting one column there costs each path, in words (the choice
  // between them): sparse, per selected pair, the row's words and a fixed cost; tiled,
  // the span's words transposed and every group's words times its rows.
  struct ImageCost {
    uint64_t rows = 0;        // non-full rows present
    uint64_t row_words = 0;   // their trimmed words
    uint64_t tile_words = 0;  // sum over groups of length * size
  };
  std::vector<ImageCost> costs_;
  // Whether image i is counted tiled when a share `selected` of a task's pairs is selected.
  bool tile_pays(uint32_t i, double selected) const;
  // Scratch of the tiled path.
  struct Tile {
    std::vector<const uint64_t*> rows;
    std::vector<uint64_t> columns;  // the image's partial wanted columns, transposed
    std::vector<std::size_t> row_at, column_at;
    std::vector<const ImageMajorIndex::Entry*> partial, full;  // image's wanted columns
  };
  // The tiled path on image i for its columns from `e` on below c1: adds every (present
  // row r, wanted column c) count into acc[(c - c0) * rows + r], each row's words into words[r].
  void tile_image(uint32_t i, const ImageMajorIndex::Entry* e, int32_t c0, int32_t c1, const std::vector<char>& wanted,
                  uint64_t* acc, uint64_t* words, Tile& tile) const;
  int64_t row_words_;
  std::vector<uint64_t> present_;    // bit r of word i * row_words_ + r / 64: row r not empty in image i
  std::vector<int64_t> rank_;        // [i * row_words_ + k]: index in row_images_ of word k's first row
  std::vector<RowImage> row_images_;  // by image, then row
  // Position in row_images_ of the record of row 64 * (word % row_words_) + bit in image
  // word / row_words_ (that row must be present there).
  std::size_t record_at(std::size_t word, int bit) const {
    return std::size_t(rank_[word]) + std::size_t(bit_count(present_[word] & ((uint64_t(1) << bit) - 1)));
  }
  // Positions in row_images_ of image i's records: [first, second).
  std::pair<int64_t, int64_t> records_of(uint32_t i) const {
    return {rank_[std::size_t(i) * std::size_t(row_words_)], rank_[std::size_t(i + 1) * std::size_t(row_words_)]};
  }
  struct Span {
    uint32_t first = 0, last = 0;  // words [first, last)
  };
  std::vector<Span> spans_;  // per image: the words the rows read there
  std::vector<uint32_t> row_image_list_;  // the images where some row is not empty
  std::vector<int64_t> ranges_;      // column ranges, one task each
};

}  // namespace pyneuron
