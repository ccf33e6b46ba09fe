// Bilinear upsampling exactly as Pillow's Image.resize(BILINEAR) on mode "F" images,
// and thresholding of the upsampled maps straight into packed bits.
#pragma once
#include <cstdint>
#include <vector>

namespace pyneuron {

// Pillow's precompute_coeffs for the bilinear filter over the whole input (box 0..in_size).
struct ResizeCoefficients {
  int in_size = 0;
  int out_size = 0;
  int ksize = 0;
  std::vector<int> bounds;   // per output: first input index, number of taps
  std::vector<double> kk;    // out_size * ksize normalized weights
  ResizeCoefficients(int in, int out);
};

// Resize one h x w float map to H x W; `temp` is scratch space (grown as needed).
// Like Pillow 13 (python-pillow/Pillow#9549), the vertical pass goes first when the
// height shrinks and h - H > 2 * (w - W); otherwise the horizontal pass does.
void resize_bilinear(const float* in, const ResizeCoefficients& horizontal,
                     const ResizeCoefficients& vertical, std::vector<float>& temp, float* out);

// For maps (n_maps = n_images * n_units, each h x w; unit = map % n_units): upsample to
// H x W and set bit p of the map's packed words when lo[unit] < value (< hi[unit] if hi).
// words: n_maps * ceil(H*W/64); counts: n_maps set-bit counts. Parallel over maps.
void upsample_threshold(const float* maps, int64_t n_maps, int64_t n_units, int h, int w,
                        const double* lo, const double* hi, int height, int width,
                        uint64_t* words, int32_t* counts);

}  // namespace pyneuron
