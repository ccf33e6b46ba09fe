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
        out = {nullptr, row.count_at(at), 0, uint32_t(w), int32_t(r)};
        continue;
      }
      const uint64_t* words = row.bitset(slot);
      std::size_t first = 0, last = w;
      while (words[first] == 0) ++first;  // a bitset here is never empty
      while (words[last - 1] == 0) --last;
      out = {words + first, row.count_at(at), uint32_t(first), uint32_t(last - first), int32_t(r)};
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
  // Per image, its non-full rows in groups of consecutive rows over nearby words (the beam
  // entries of one unit, inside the unit's pixels): a row joins the group while the
  // group's words stay under twice the words its rows cover.
  group_offsets_.assign(std::size_t(n_images) + 1, 0);
  for (uint32_t i = 0; i < n_images; ++i) {
    const auto [begin, end] = records_of(i);
    RowGroup group{0, 0, 0, 0};
    uint64_t covered = 0;
    for (int64_t at = begin; at < end; ++at) {
      const RowImage& row = row_images_[std::size_t(at)];
      if (row.bits == nullptr) continue;
      const uint32_t first = std::min(group.first, row.first);
      const uint32_t last = std::max(group.first + group.length, row.first + row.length);
      const bool joins = group.size > 0 && group.size < kGroupRows &&
                         uint64_t(last - first) * (group.size + 1) <= 2 * (covered + row.length);
      if (joins) {
        group = {group.record, group.size + 1, first, last - first};
        covered += row.length;
        continue;
      }
      if (group.size > 0) groups_.push_back(group);
      group = {at, 1, row.first, row.length};
      covered = row.length;
    }
    if (group.size > 0) groups_.push_back(group);
    group_offsets_[i + 1] = int64_t(groups_.size());
  }
  costs_.resize(n_images);
  for (uint32_t i = 0; i < n_images; ++i) {
    const auto [begin, end] = records_of(i);
    for (int64_t at = begin; at < end; ++at)
      if (row_images_[std::size_t(at)].bits != nullptr) {
        ++costs_[i].rows;
        costs_[i].row_words += row_images_[std::size_t(at)].length;
      }
    for (int64_t g = group_offsets_[i]; g < group_offsets_[i + 1]; ++g)
      costs_[i].tile_words += uint64_t(groups_[std::size_t(g)].length) * groups_[std::size_t(g)].size;
  }
}

bool PairCounter::tile_pays(uint32_t i, double selected) const {
  // Estimates in words, tuned on an AVX2 core (faster on dense units, no slower on the
  // sparse small and medium benchmark sets): a selected pair costs about 24 words besides
  // its own in the sparse path; a word of the tiled kernel costs one, a transposed word
  // three. Under kTileMinRows rows the transposition does not pay (the sparse units of the
  // small and medium sets: a few rows an image).
  const ImageCost& cost = costs_[i];
  if (cost.rows < kTileMinRows) return false;
  const double sparse = selected * double(24 * cost.rows + cost.row_words);
  const double tiled = 3.0 * double(spans_[i].last - spans_[i].first) + double(cost.tile_words);
  return tiled < sparse;
}

void PairCounter::tile_image(uint32_t i, const ImageMajorIndex::Entry* e, int32_t c0, int32_t c1,
                             const std::vector<char>& wanted, uint64_t* acc, uint64_t* words, Tile& tile) const {
  const std::size_t n_rows = rows_.size();
  tile.partial.clear();
  tile.full.clear();
  for (; e != index_.end(i) && e->mask < c1; ++e)
    if (wanted[e->mask]) (e->slot == kFullSlot ? tile.full : tile.partial).push_back(e);
  if (tile.partial.empty() && tile.full.empty()) return;
  const auto [begin, end] = records_of(i);
  // Full rows: the column's count; full columns: the row's.
  for (int64_t at = begin; at < end; ++at) {
    const RowImage& row = row_images_[std::size_t(at)];
    if (row.bits == nullptr) {
      for (const ImageMajorIndex::Entry* x : tile.partial)
        acc[std::size_t(x->mask - c0) * n_rows + std::size_t(row.row)] += uint64_t(x->count);
    }
    for (const ImageMajorIndex::Entry* x : tile.full)
      acc[std::size_t(x->mask - c0) * n_rows + std::size_t(row.row)] += uint64_t(row.count);
  }
  if (tile.partial.empty()) return;
  tile.column_at.clear();
  for (const ImageMajorIndex::Entry* x : tile.partial) tile.column_at.push_back(std::size_t(x->mask - c0) * n_rows);
  // Word k of the span, of every column: contiguous (the padding columns are read, not counted).
  const std::size_t n_cols = tile.partial.size();
  const std::size_t stride = (n_cols + kTileStride - 1) / kTileStride * kTileStride;
  const Span span = spans_[i];
  tile.columns.resize(std::size_t(span.last - span.first) * stride);
  for (std::size_t j = 0; j < n_cols; ++j) {
    const uint64_t* bits = columns_.bitset(tile.partial[j]->slot);
    for (uint32_t k = span.first; k < span.last; ++k) tile.columns[std::size_t(k - span.first) * stride + j] = bits[k];
  }
  const TileCountFn kernel = tile_count_kernel();
  for (int64_t g = group_offsets_[i]; g < group_offsets_[i + 1]; ++g) {
    const RowGroup& group = groups_[std::size_t(g)];
    tile.rows.clear();
    tile.row_at.clear();
    for (int64_t at = group.record; tile.rows.size() < group.size; ++at) {
      const RowImage& row = row_images_[std::size_t(at)];
      if (row.bits == nullptr) continue;
      // Outside its trimmed words the row's bitset there is zero.
      tile.rows.push_back(row.bits - row.first + group.first);
      tile.row_at.push_back(std::size_t(row.row));
      words[row.row] += uint64_t(group.length) * n_cols;
    }
    kernel(tile.rows.data(), tile.row_at.data(), tile.rows.size(),
           tile.columns.data() + std::size_t(group.first - span.first) * stride, stride, tile.column_at.data(), n_cols,
           group.length, acc);
  }
}

BatchCounts PairCounter::count(const PairSet* pairs, CountPath path) const {
  const int64_t n_rows = int64_t(rows_.size());
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
  // The share of the (row, wanted column) pairs of columns [c0, c1) that are selected: the
  // tiled path counts them all, into a dense accumulator (where that stays small: a
  // negative share rules the tiled path out).
  const auto selected_share = [&](int32_t c0, int32_t c1) {
    if (path == CountPath::Sparse || uint64_t(n_rows) * uint64_t(c1 - c0) > (uint64_t(1) << 22)) return -1.0;
    if (pairs == nullptr) return 1.0;
    uint64_t open = 0, selected = 0;
    for (int32_t c = c0; c < c1; ++c) {
      if (!wanted[c]) continue;
      open += uint64_t(n_rows);
      selected += uint64_t(pairs->first(std::size_t(c + 1) * row_words) - pairs->first(std::size_t(c) * row_words));
    }
    return open == 0 ? 0.0 : double(selected) / double(open);
  };
  std::mutex words_mutex;
  parallel_for(int64_t(ranges_.size()) - 1, [&](int64_t task) {
    const int32_t c0 = int32_t(ranges_[task]), c1 = int32_t(ranges_[task + 1]);
    std::vector<uint64_t> words(std::size_t(n_rows), 0);
    const double share = selected_share(c0, c1);
    // The counts of the images counted tiled, columns [c0, c1), column-major: zeroed on the
    // first such image, in a buffer the thread keeps between passes (no page faults).
    thread_local std::vector<uint64_t> acc;
    bool dense = false;
    Tile tile;
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
      if (share >= 0 && (path == CountPath::Tiled || tile_pays(i, share))) {
        if (!dense) acc.assign(std::size_t(n_rows) * std::size_t(c1 - c0), 0);
        dense = true;
        tile_image(i, first_entry(i), c0, c1, wanted, acc.data(), words.data(), tile);
        continue;
      }
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
              out.counts[at(r)] += uint64_t(row.count);
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
    // The tiled images' counts to their pairs, column by column (tasks own their columns).
    for (int32_t c = c0; dense && c < c1; ++c) {
      const uint64_t* counted = acc.data() + std::size_t(c - c0) * std::size_t(n_rows);
      if (pairs == nullptr) {
        uint64_t* to = out.counts.data() + std::size_t(c) * std::size_t(n_rows);
        for (int64_t r = 0; r < n_rows; ++r) to[r] += counted[r];
        continue;
      }
      for (int64_t k = 0; k < row_words; ++k) {
        uint64_t bits = pairs->column(c)[k];
        uint64_t* to = out.counts.data() + pairs->first(std::size_t(c) * row_words + std::size_t(k));
        for (; bits != 0; bits &= bits - 1) *to++ += counted[k * 64 + __builtin_ctzll(bits)];
      }
    }
    if (acc.size() > (std::size_t(1) << 20)) std::vector<uint64_t>().swap(acc);  // over 8 MiB: freed
    std::lock_guard<std::mutex> lock(words_mutex);
    for (int64_t r = 0; r < n_rows; ++r) out.words[r] += words[r];
  });
  return out;
}

}  // namespace pyneuron
