#include "batch_count.hpp"

#include <algorithm>
#include <mutex>

#include "popcount.hpp"
#include "thread_pool.hpp"

namespace pyneuron {

ImageMajorIndex::ImageMajorIndex(const MaskSetView& set) : offsets_(std::size_t(set.grid.n_images) + 1, 0) {
  for (int64_t e = 0; e < set.n_entries; ++e) ++offsets_[std::size_t(set.images[e]) + 1];
  for (std::size_t i = 1; i < offsets_.size(); ++i) offsets_[i] += offsets_[i - 1];
  entries_.resize(std::size_t(set.n_entries));
  std::vector<int64_t> fill(offsets_.begin(), offsets_.end() - 1);
  // Masks in increasing order, so each image's entries come out sorted by mask.
  for (int64_t m = 0; m < set.n_masks; ++m)
    for (int64_t e = set.offsets[m]; e < set.offsets[m + 1]; ++e)
      entries_[std::size_t(fill[std::size_t(set.images[e])]++)] = {int32_t(m), set.counts[e], set.slots[e]};
}

namespace {

// Column ranges of about equal numbers of entries, a few per thread for balance.
std::vector<int64_t> column_ranges(const MaskSetView& columns) {
  const int64_t n = columns.n_masks;
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(n, 4 * int64_t(num_threads())));
  std::vector<int64_t> bounds{0};
  const int64_t total = columns.offsets[n];
  for (int64_t t = 1; t < tasks; ++t) {
    const int64_t target = total * t / tasks;
    const int64_t c = std::upper_bound(columns.offsets, columns.offsets + n + 1, target) - columns.offsets - 1;
    if (c > bounds.back() && c < n) bounds.push_back(c);
  }
  bounds.push_back(n);
  return bounds;
}

}  // namespace

PairCounter::PairCounter(const std::vector<const SparseMask*>& rows, const MaskSetView& columns,
                         const ImageMajorIndex& index)
    : rows_(rows),
      columns_(columns),
      index_(index),
      row_words_((int64_t(rows.size()) + 63) / 64),
      present_(std::size_t(columns.grid.n_images) * std::size_t(row_words_), 0),
      rank_(present_.size() + 1, 0),
      spans_(columns.grid.n_images),
      ranges_(column_ranges(columns)) {
  const uint32_t n_images = columns.grid.n_images;
  const std::size_t w = columns.grid.words_per_image;
  const int64_t n_rows = int64_t(rows.size());
  // Tasks own groups of 64 rows: word k of every image.
  parallel_for(row_words_, [&](int64_t k) {
    for (int64_t r = k * 64; r < std::min(n_rows, k * 64 + 64); ++r)
      for (const uint32_t i : rows[r]->images())
        present_[std::size_t(i) * row_words_ + k] |= uint64_t(1) << (r % 64);
  });
  for (std::size_t k = 0; k < present_.size(); ++k) rank_[k + 1] = rank_[k] + bit_count(present_[k]);
  row_images_.resize(std::size_t(rank_.back()));
  // Row by row (each row's arrays read in order), into the image-major records.
  parallel_for(n_rows, [&](int64_t r) {
    const std::size_t k = std::size_t(r) / 64;
    const SparseMask& row = *rows[r];
    for (std::size_t at = 0; at < row.images().size(); ++at) {
      RowImage& out = row_images_[record_at(std::size_t(row.images()[at]) * row_words_ + k, int(r % 64))];
      const int32_t slot = row.slot_at(at);
      if (slot == SparseMask::kFull) {
        out = {nullptr, row.count_at(at), 0, uint32_t(w)};
        continue;
      }
      const uint64_t* words = row.bitset(slot);
      std::size_t first = 0, last = w;
      while (words[first] == 0) ++first;  // a bitset here is never empty
      while (words[last - 1] == 0) --last;
      out = {words + first, row.count_at(at), uint32_t(first), uint32_t(last - first)};
    }
  });
  for (uint32_t i = 0; i < n_images; ++i) {
    const auto [begin, end] = records_of(i);
    if (begin != end) row_image_list_.push_back(i);
  }
  // Per image, the span of words any row reads there.
  parallel_for((int64_t(n_images) + 255) / 256, [&](int64_t block) {
    const uint32_t lo = uint32_t(block * 256), hi = std::min<uint32_t>(n_images, lo + 256);
    for (uint32_t i = lo; i < hi; ++i) {
      const auto [begin, end] = records_of(i);
      if (begin == end) continue;
      Span span{uint32_t(w), 0};
      for (int64_t at = begin; at < end; ++at) {
        const RowImage& row = row_images_[std::size_t(at)];
        span = {std::min(span.first, row.first), std::max(span.last, row.first + row.length)};
      }
      spans_[i] = span;
    }
  });
}

BatchCounts PairCounter::count(const PairSet* pairs) const {
  const int64_t n_rows = int64_t(rows_.size());
  const uint32_t n_images = columns_.grid.n_images;
  const std::size_t w = columns_.grid.words_per_image;
  const int64_t row_words = row_words_;
  BatchCounts out;
  out.counts.assign(pairs != nullptr ? std::size_t(pairs->size()) : std::size_t(n_rows) * std::size_t(columns_.n_masks), 0);
  out.words.assign(std::size_t(n_rows), 0);
  if (n_rows == 0 || columns_.n_masks == 0) return out;
  const AndPopcountManyFn many = and_popcount_many_kernel();
  const AndPopcountFn single = and_popcount_kernel();
  // Columns with some selected pair: the others' entries are skipped with one load.
  std::vector<char> wanted(std::size_t(columns_.n_masks), pairs == nullptr);
  if (pairs != nullptr)
    for (int64_t c = 0; c < columns_.n_masks; ++c)
      for (int64_t k = 0; k < row_words && !wanted[c]; ++k) wanted[c] = pairs->column(c)[k] != 0;
  std::mutex words_mutex;
  parallel_for(int64_t(ranges_.size()) - 1, [&](int64_t task) {
    const int32_t c0 = int32_t(ranges_[task]), c1 = int32_t(ranges_[task + 1]);
    std::vector<uint64_t> words(std::size_t(n_rows), 0);
    std::vector<std::pair<int64_t, const RowImage*>> partial;
    std::vector<const uint64_t*> operands;
    std::vector<uint64_t> results;
    const auto by_mask = [](const ImageMajorIndex::Entry& e, int32_t m) { return e.mask < m; };
    const auto first_entry = [&](uint32_t i) { return std::lower_bound(index_.begin(i), index_.end(i), c0, by_mask); };
    // The bitsets of an image's columns (the words its rows read) and of its rows, fetched
    // from memory while the images before it are counted.
    const auto prefetch = [&](std::size_t at) {
      if (at >= row_image_list_.size()) return;
      const uint32_t i = row_image_list_[at];
      for (const ImageMajorIndex::Entry* e = first_entry(i); e != index_.end(i) && e->mask < c1; ++e) {
        if (e->slot == kFullSlot || !wanted[e->mask]) continue;
        prefetch_words(columns_.bitset(e->slot) + spans_[i].first, spans_[i].last - spans_[i].first);
      }
      const auto [begin, end] = records_of(i);
      for (int64_t r = begin; r < end; ++r)
        if (row_images_[std::size_t(r)].bits != nullptr)
          prefetch_words(row_images_[std::size_t(r)].bits, row_images_[std::size_t(r)].length);
    };
    const std::size_t ahead = 2;  // images: one was too close to hide the memory's latency
    for (std::size_t k = 0; k < ahead; ++k) prefetch(k);
    for (std::size_t at = 0; at < row_image_list_.size(); ++at) {
      prefetch(at + ahead);
      const uint32_t i = row_image_list_[at];
      const std::size_t first = std::size_t(i) * row_words;
      const uint64_t* here = present_.data() + first;
      const ImageMajorIndex::Entry* end = index_.end(i);
      for (const ImageMajorIndex::Entry* e = first_entry(i); e != end && e->mask < c1; ++e) {
        if (!wanted[e->mask]) continue;
        const uint64_t* selected = pairs != nullptr ? pairs->column(e->mask) : nullptr;
        // Where the count of (row r, this column) goes.
        const auto at = [&](int64_t r) {
          return std::size_t(selected != nullptr ? pairs->index(r, e->mask) : int64_t(e->mask) * n_rows + r);
        };
        const bool full = e->slot == kFullSlot;
        // The selected rows here: full ones counted at once, partial ones gathered.
        partial.clear();
        std::size_t trimmed_words = 0;
        for (int64_t k = 0; k < row_words; ++k) {
          const uint64_t mine = here[k];
          uint64_t bits = mine & (selected != nullptr ? selected[k] : ~uint64_t(0));
          while (bits != 0) {
            const int bit = __builtin_ctzll(bits);
            bits &= bits - 1;
            const int64_t r = k * 64 + bit;
            const RowImage& row = row_images_[record_at(first + k, bit)];
            if (row.bits == nullptr) {
              out.counts[at(r)] += uint64_t(e->count);
            } else if (full) {
              out.counts[at(r)] += row.count;
            } else {
              partial.push_back({r, &row});
              trimmed_words += row.length;
            }
          }
        }
        if (partial.empty()) continue;
        const uint64_t* column = columns_.bitset(e->slot);
        const Span span = spans_[i];
        const std::size_t span_words = span.last - span.first;
        if (partial.size() == 1 || span_words * partial.size() > 2 * trimmed_words) {
          // Each row on its own words (rows far apart, or one).
          for (const auto& [r, row] : partial) {
            out.counts[at(r)] += single(row->bits, column + row->first, row->length);
            words[r] += row->length;
          }
          continue;
        }
        // All of them over the image's span in one call: the column's words loaded once.
        operands.clear();
        for (const auto& [r, row] : partial) operands.push_back(row->bits - row->first + span.first);
        results.resize(operands.size());
        many(column + span.first, operands.data(), operands.size(), span_words, results.data());
        for (std::size_t j = 0; j < partial.size(); ++j) {
          out.counts[at(partial[j].first)] += results[j];
          words[partial[j].first] += span_words;
        }
      }
    }
    std::lock_guard<std::mutex> lock(words_mutex);
    for (int64_t r = 0; r < n_rows; ++r) out.words[r] += words[r];
  });
  return out;
}

}  // namespace pyneuron
