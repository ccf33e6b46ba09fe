// Containers: Grid, MaskSetView (CSR of empty / full / bitset image blocks) and SparseMask,
// checked against masks held as one byte per pixel.
#include <cstdint>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "check.hpp"
#include "dense.hpp"
#include "mask_set.hpp"
#include "popcount.hpp"
#include "sparse_mask.hpp"

using namespace pyneuron_test;
using pyneuron::SparseMask;

namespace {

// Pixel counts per image around the word boundaries (and 1: images are empty or full).
const uint64_t kPixels[] = {1, 7, 63, 64, 65, 100, 127, 128, 129, 200};

// The mask's containers are canonical and agree with the dense mask: one entry per
// non-empty image, increasing, full exactly where every pixel is set, bitsets with their
// counts and zero padding; totals and dense words as the dense mask.
void check_sparse(const Grid& g, const SparseMask& s, const Bits& expected) {
  CHECK_EQ(s.total(), count_bits(expected));
  CHECK_EQ(s.nonempty_images(), nonempty_images(g, expected));
  std::size_t k = 0;
  for (uint64_t i = 0; i < g.n_images; ++i) {
    const uint64_t n = count_image(g, expected, i);
    if (n == 0) continue;
    if (k >= s.images().size()) {
      CHECK(k < s.images().size());
      return;
    }
    CHECK_EQ(uint64_t(s.images()[k]), i);
    CHECK_EQ(uint64_t(s.count_at(k)), n);
    if (n == g.pixels) {
      CHECK_EQ(s.slot_at(k), SparseMask::kFull);
    } else {
      CHECK(s.slot_at(k) >= 0);
      if (s.slot_at(k) >= 0) {
        const uint64_t* bits = s.bitset(s.slot_at(k));
        CHECK_EQ(pyneuron::popcount_words(bits, g.words_per_image), n);
        CHECK_EQ(bits[g.words_per_image - 1] & ~g.last_word_mask(), uint64_t(0));
      }
    }
    ++k;
  }
  CHECK_EQ(k, s.images().size());
  bool padding = false;
  const std::vector<uint64_t> words = s.to_words();
  CHECK_EQ(words.size(), std::size_t(g.n_images * g.words_per_image));
  CHECK(unpack(g, words, &padding) == expected);
  CHECK(!padding);
  CHECK(words == pack(g, expected));
}

}  // namespace

TEST_CASE(grid_shape) {
  for (const uint64_t p : kPixels) {
    const Grid g(3, p);
    Scope scope("pixels " + std::to_string(p));
    CHECK_EQ(g.words_per_image, (p + 63) / 64);
    CHECK_EQ(g.total_pixels(), 3 * p);
    // The last word's valid bits: exactly the pixels beyond the full words.
    const uint64_t valid = p - (g.words_per_image - 1) * 64;
    CHECK_EQ(uint64_t(pyneuron::bit_count(g.last_word_mask())), valid);
    CHECK_EQ(g.last_word_mask() & 1, uint64_t(1));
  }
  CHECK(Grid(2, 70) == Grid(2, 70));
  CHECK(!(Grid(2, 70) == Grid(2, 71)));
  CHECK(!(Grid(3, 70) == Grid(2, 70)));
  CHECK_THROWS(Grid(pyneuron::kMaxGridImages + 1, 10), std::invalid_argument);
  CHECK_THROWS(Grid(10, pyneuron::kMaxImagePixels + 1), std::invalid_argument);
}

// Hand-built masks on 4 images of 70 pixels (two words, 58 padding bits): each kind of
// container, and the CSR arrays the builder makes of them.
TEST_CASE(containers_from_bitsets) {
  const Grid g(4, 70);
  const uint64_t p = g.pixels;
  Bits a(g.n_images * p, 0);                              // image 0 empty
  for (uint64_t k = 0; k < p; ++k) a[1 * p + k] = 1;      // image 1 full
  a[2 * p + 0] = a[2 * p + 63] = a[2 * p + 64] = a[2 * p + 69] = 1;  // image 2: 4 pixels, both words
  for (uint64_t k = 0; k < p - 1; ++k) a[3 * p + k] = 1;  // image 3: all but the last pixel
  const Bits empty(g.n_images * p, 0);
  const Bits full(g.n_images * p, 1);
  const OwnedMaskSet set = build_mask_set(g, {a, empty, full});

  CHECK_EQ(set.view.n_masks, int64_t(3));
  CHECK((set.offsets == std::vector<int64_t>{0, 3, 3, 7}));
  CHECK((set.images == std::vector<int32_t>{1, 2, 3, 0, 1, 2, 3}));
  CHECK((set.slots == std::vector<int64_t>{pyneuron::kFullSlot, 0, 1, -1, -1, -1, -1}));
  CHECK((set.counts == std::vector<int32_t>{70, 4, 69, 70, 70, 70, 70}));
  CHECK_EQ(set.view.n_slots, int64_t(2));
  CHECK_EQ(set.words[0], (uint64_t(1) << 0) | (uint64_t(1) << 63));
  CHECK_EQ(set.words[1], (uint64_t(1) << 0) | (uint64_t(1) << 5));
  CHECK_EQ(set.words[3], g.last_word_mask() >> 1);
  set.view.validate();
  set.view.verify_words();

  for (int64_t m = 0; m < 3; ++m) {
    Scope scope("mask " + std::to_string(m));
    const Bits& expected = m == 0 ? a : m == 1 ? empty : full;
    check_sparse(g, SparseMask::from_set(set.view, m), expected);
    check_sparse(g, SparseMask::view_of(set.view, m), expected);
  }
  const SparseMask sa = SparseMask::from_set(set.view, 0);
  CHECK_EQ(sa.total(), uint64_t(70 + 4 + 69));
  CHECK_EQ(sa.nonempty_images(), uint64_t(3));
  CHECK_EQ(SparseMask::from_set(set.view, 1).total(), uint64_t(0));
  CHECK_EQ(SparseMask::from_set(set.view, 2).total(), uint64_t(4 * 70));
  // An empty mask of the grid, and its complement: every image full.
  const SparseMask none(g);
  check_sparse(g, none, empty);
  check_sparse(g, none.complement(), full);
  // Complement of image 3 (all but the last pixel): one pixel, in the padded word.
  check_sparse(g, sa.complement(), negate(a));
}

// Random masks on grids of every pixel count in kPixels: the arrays validate, the views and
// copies agree with the dense masks, and every operation's result matches the bytewise one
// with canonical containers and zero padding.
TEST_CASE(random_masks_and_operations) {
  std::mt19937_64 rng(12345);
  const BinaryOp ops[] = {BinaryOp::Or, BinaryOp::And, BinaryOp::AndNot, BinaryOp::OrNot};
  const char* op_names[] = {"OR", "AND", "AND NOT", "OR NOT"};
  for (const uint64_t p : kPixels) {
    for (const uint64_t n : {uint64_t(1), uint64_t(6)}) {
      const Grid g(n, p);
      std::vector<Bits> masks;
      for (int m = 0; m < 6; ++m) masks.push_back(random_mask(g, rng));
      masks.push_back(Bits(n * p, 0));
      masks.push_back(Bits(n * p, 1));
      const OwnedMaskSet set = build_mask_set(g, masks);
      Scope scope("grid " + std::to_string(n) + "x" + std::to_string(p));
      set.view.validate();
      set.view.verify_words();
      for (std::size_t x = 0; x < masks.size(); ++x) {
        const SparseMask copy = SparseMask::from_set(set.view, int64_t(x));
        const SparseMask view = SparseMask::view_of(set.view, int64_t(x));
        Scope mask_scope("mask " + std::to_string(x));
        check_sparse(g, copy, masks[x]);
        check_sparse(g, view, masks[x]);
        check_sparse(g, copy.complement(), negate(masks[x]));
        for (std::size_t y = 0; y < masks.size(); ++y) {
          Scope pair_scope("with mask " + std::to_string(y));
          const Bits both = apply(BinaryOp::And, masks[x], masks[y]);
          uint64_t images = 0;
          CHECK_EQ(view.intersect_count(set.view, int64_t(y), &images), count_bits(both));
          CHECK_EQ(images, nonempty_images(g, both));
          const SparseMask other = SparseMask::view_of(set.view, int64_t(y));
          const SparseMask with = SparseMask::from_set(set.view, int64_t((x + y) % masks.size()));
          const Bits& with_bits = masks[(x + y) % masks.size()];
          for (int k = 0; k < 4; ++k) {
            Scope op_scope(op_names[k]);
            const Bits expected = apply(ops[k], masks[x], masks[y]);
            check_sparse(g, view.combine(other, ops[k]), expected);
            check_sparse(g, copy.combine(set.view, int64_t(y), ops[k]), expected);
            const pyneuron::CombinedCounts c = view.combined_counts(set.view, int64_t(y), ops[k], with);
            const Bits inter = apply(BinaryOp::And, expected, with_bits);
            CHECK_EQ(c.total, count_bits(expected));
            CHECK_EQ(c.images, nonempty_images(g, expected));
            CHECK_EQ(c.with_total, count_bits(inter));
            CHECK_EQ(c.with_images, nonempty_images(g, inter));
          }
        }
      }
    }
  }
}

// validate() and verify_words() refuse inconsistent arrays.
TEST_CASE(validation_refuses_inconsistent_sets) {
  const Grid g(3, 70);
  Bits a(3 * 70, 0);
  for (uint64_t k = 0; k < 70; ++k) a[k] = 1;  // image 0 full
  a[70 + 3] = a[70 + 66] = 1;                   // image 1 partial
  a[140 + 10] = 1;                              // image 2 partial
  const auto fresh = [&] { return build_mask_set(g, {a, a}); };
  {
    OwnedMaskSet s = fresh();
    s.view.validate();
    s.view.verify_words();
  }
  {
    OwnedMaskSet s = fresh();
    s.counts[0] = 69;  // a full container with a count other than the image size
    s.refresh(g);
    CHECK_THROWS(s.view.validate(), std::invalid_argument);
  }
  {
    OwnedMaskSet s = fresh();
    s.images[2] = 1;  // images not increasing within mask 0
    s.refresh(g);
    CHECK_THROWS(s.view.validate(), std::invalid_argument);
  }
  {
    OwnedMaskSet s = fresh();
    s.images[2] = 3;  // image beyond the grid
    s.refresh(g);
    CHECK_THROWS(s.view.validate(), std::invalid_argument);
  }
  {
    OwnedMaskSet s = fresh();
    s.slots[4] = s.slots[1];  // a bitset used twice (and one never)
    s.refresh(g);
    CHECK_THROWS(s.view.validate(), std::invalid_argument);
  }
  {
    OwnedMaskSet s = fresh();
    s.counts[1] = 0;  // a bitset container holding nothing
    s.refresh(g);
    CHECK_THROWS(s.view.validate(), std::invalid_argument);
  }
  {
    OwnedMaskSet s = fresh();
    s.offsets.back() -= 1;  // last offset short of the entries
    s.refresh(g);
    s.view.n_entries = int64_t(s.images.size());
    CHECK_THROWS(s.view.validate(), std::invalid_argument);
  }
  {
    OwnedMaskSet s = fresh();
    s.words.resize(s.words.size() + g.words_per_image, 0);  // a bitset no entry uses
    s.refresh(g);
    CHECK_THROWS(s.view.validate(), std::invalid_argument);
  }
  {
    OwnedMaskSet s = fresh();
    s.words[1] |= uint64_t(1) << 10;  // a padding bit (pixel 74 of a 70-pixel image)
    s.refresh(g);
    s.view.validate();  // the index alone is consistent
    CHECK_THROWS(s.view.verify_words(), std::invalid_argument);
  }
  {
    OwnedMaskSet s = fresh();
    s.words[0] ^= uint64_t(1) << 4;  // the bitset no longer holds its stored count
    s.refresh(g);
    s.view.validate();
    CHECK_THROWS(s.view.verify_words(), std::invalid_argument);
  }
}

TEST_MAIN()
