// Compiled with -ffp-contract=off: the sums must round exactly as Pillow's do.
#include "upsample.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>

#include "thread_pool.hpp"

namespace pyneuron {

namespace {
double bilinear_filter(double x) {
  if (x < 0.0) x = -x;
  return x < 1.0 ? 1.0 - x : 0.0;
}
}  // namespace

ResizeCoefficients::ResizeCoefficients(int in, int out) : in_size(in), out_size(out) {
  if (in < 1 || out < 1) throw std::invalid_argument("resize sizes must be positive");
  const double scale = double(in) / out;
  const double filterscale = scale < 1.0 ? 1.0 : scale;
  const double support = 1.0 * filterscale;
  ksize = int(std::ceil(support)) * 2 + 1;
  bounds.assign(std::size_t(out) * 2, 0);
  kk.assign(std::size_t(out) * ksize, 0.0);
  for (int xx = 0; xx < out; ++xx) {
    const double center = 0.0 + (xx + 0.5) * scale;
    const double ss = 1.0 / filterscale;
    int xmin = int(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = int(center + support + 0.5);
    if (xmax > in) xmax = in;
    xmax -= xmin;
    double* k = &kk[std::size_t(xx) * ksize];
    double ww = 0.0;
    for (int x = 0; x < xmax; ++x) {
      const double weight = bilinear_filter((x + xmin - center + 0.5) * ss);
      k[x] = weight;
      ww += weight;
    }
    for (int x = 0; x < xmax; ++x)
      if (ww != 0.0) k[x] /= ww;
    bounds[std::size_t(xx) * 2] = xmin;
    bounds[std::size_t(xx) * 2 + 1] = xmax;
  }
}

namespace {
// One pass of Pillow's two-pass resize along rows (horizontal) or columns (vertical) of
// an n_rows x n_cols float map; each output is the double sum of its taps, stored as float.
void resize_rows(const float* in, int n_rows, int n_cols, const ResizeCoefficients& c, float* out) {
  for (int y = 0; y < n_rows; ++y) {
    for (int xx = 0; xx < c.out_size; ++xx) {
      const int xmin = c.bounds[std::size_t(xx) * 2];
      const int xmax = c.bounds[std::size_t(xx) * 2 + 1];
      const double* k = &c.kk[std::size_t(xx) * c.ksize];
      double ss = 0.0;
      for (int x = 0; x < xmax; ++x) ss += double(in[std::size_t(y) * n_cols + x + xmin]) * k[x];
      out[std::size_t(y) * c.out_size + xx] = float(ss);
    }
  }
}

void resize_columns(const float* in, int n_cols, const ResizeCoefficients& c, float* out) {
  for (int yy = 0; yy < c.out_size; ++yy) {
    const int ymin = c.bounds[std::size_t(yy) * 2];
    const int ymax = c.bounds[std::size_t(yy) * 2 + 1];
    const double* k = &c.kk[std::size_t(yy) * c.ksize];
    for (int xx = 0; xx < n_cols; ++xx) {
      double ss = 0.0;
      for (int y = 0; y < ymax; ++y) ss += double(in[std::size_t(y + ymin) * n_cols + xx]) * k[y];
      out[std::size_t(yy) * n_cols + xx] = float(ss);
    }
  }
}
}  // namespace

void resize_bilinear(const float* in, const ResizeCoefficients& horizontal,
                     const ResizeCoefficients& vertical, std::vector<float>& temp, float* out) {
  const int h = vertical.in_size, w = horizontal.in_size;
  const int H = vertical.out_size, W = horizontal.out_size;
  // Pillow skips a pass whose size does not change.
  if (W == w && H == h) {
    std::memcpy(out, in, sizeof(float) * std::size_t(h) * w);
  } else if (W == w) {
    resize_columns(in, w, vertical, out);
  } else if (H == h) {
    resize_rows(in, h, w, horizontal, out);
  } else if (H < h && int64_t(h) - H > 2 * (int64_t(w) - W)) {
    temp.resize(std::max(temp.size(), std::size_t(H) * w));
    resize_columns(in, w, vertical, temp.data());
    resize_rows(temp.data(), H, w, horizontal, out);
  } else {
    temp.resize(std::max(temp.size(), std::size_t(h) * W));
    resize_rows(in, h, w, horizontal, temp.data());
    resize_columns(temp.data(), W, vertical, out);
  }
}

void upsample_threshold(const float* maps, int64_t n_maps, int64_t n_units, int h, int w,
                        const double* lo, const double* hi, int height, int width,
                        uint64_t* words, int32_t* counts) {
  const ResizeCoefficients horizontal(w, width), vertical(h, height);
  const std::size_t pixels = std::size_t(height) * width;
  // counts are int32: at most 2^31 - 1 pixels per image (as Grid allows).
  if (pixels > std::size_t(std::numeric_limits<int32_t>::max()))
    throw std::invalid_argument("an image holds at most 2**31 - 1 pixels (height * width)");
  const std::size_t words_per_map = (pixels + 63) / 64;
  const std::size_t map_size = std::size_t(h) * w;
  constexpr int64_t kBlock = 64;  // maps per task: amortizes the scratch buffers
  parallel_for((n_maps + kBlock - 1) / kBlock, [&](int64_t block) {
    std::vector<float> temp(std::size_t(h) * width), out(pixels);
    for (int64_t m = block * kBlock; m < std::min(n_maps, (block + 1) * kBlock); ++m) {
      const float* map = maps + std::size_t(m) * map_size;
      uint64_t* bits = words + std::size_t(m) * words_per_map;
      std::fill(bits, bits + words_per_map, 0);
      counts[m] = 0;
      const int64_t unit = m % n_units;
      const double low = lo[unit];
      const double high = hi != nullptr ? hi[unit] : INFINITY;
      // Bilinear weights are non-negative and sum to one, so no upsampled value
      // leaves [min, max] of the map: skip maps that cannot pass the test.
      const auto [min_it, max_it] = std::minmax_element(map, map + map_size);
      if (!(double(*max_it) > low) || !(double(*min_it) < high)) continue;
      resize_bilinear(map, horizontal, vertical, temp, out.data());
      int32_t count = 0;
      for (std::size_t p = 0; p < pixels; ++p) {
        const double v = out[p];
        if (v > low && v < high) {
          bits[p / 64] |= uint64_t(1) << (p % 64);
          ++count;
        }
      }
      counts[m] = count;
    }
  });
}

}  // namespace pyneuron
