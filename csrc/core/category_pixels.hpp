// NetDissect-Lite's category-restricted unit sizes (its tally_units_cat).
#pragma once
#include <cstdint>

#include "mask_set.hpp"

namespace pyneuron {

// For units [unit_begin, unit_end) and concepts whose category is category[c] in
// [0, n_categories): out[(u - unit_begin) * n_categories + k] = the pixels of unit u,
// summed over the images where some concept of category k shares a pixel with the unit
// (NetDissect-Lite counts a unit's pixels for category k only in those images).
// Parallel over blocks of images.
void category_unit_pixels(const MaskSetView& units, int64_t unit_begin, int64_t unit_end,
                          const MaskSetView& concepts, const int32_t* category,
                          int32_t n_categories, int64_t* out);

}  // namespace pyneuron
