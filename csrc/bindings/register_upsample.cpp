#include <cmath>
#include <limits>
#include <optional>
#include <stdexcept>
#include <vector>

#include "bindings.hpp"
#include "upsample.hpp"

namespace pyneuron::bindings {

namespace {

// A map side as int (the resize code's type), refusing sides that do not fit.
int side(py::ssize_t n) {
  if (n < 1 || n > std::numeric_limits<int>::max()) throw std::invalid_argument("sizes must be positive and below 2**31");
  return static_cast<int>(n);
}

py::array_t<float> run_bilinear_resize(const CArray<float>& maps, int height, int width) {
  if (maps.ndim() != 3) throw std::invalid_argument("maps must have shape (n, h, w)");
  const py::ssize_t n = maps.shape(0);
  const int h = side(maps.shape(1)), w = side(maps.shape(2));
  if (h < 1 || w < 1 || height < 1 || width < 1) throw std::invalid_argument("sizes must be positive");
  py::array_t<float> out({n, static_cast<py::ssize_t>(height), static_cast<py::ssize_t>(width)});
  const float* in = maps.data();
  float* dst = out.mutable_data();
  py::gil_scoped_release release;
  const ResizeCoefficients horizontal(w, width), vertical(h, height);
  std::vector<float> temp(std::size_t(h) * width);
  for (py::ssize_t i = 0; i < n; ++i)
    resize_bilinear(in + std::size_t(i) * h * w, horizontal, vertical, temp,
                    dst + std::size_t(i) * height * width);
  return out;
}

py::tuple run_upsample_threshold(const CArray<float>& maps, const CArray<double>& lo,
                                 const std::optional<CArray<double>>& hi, int height, int width) {
  if (maps.ndim() != 4) throw std::invalid_argument("maps must have shape (images, units, h, w)");
  const py::ssize_t n_images = maps.shape(0), n_units = maps.shape(1);
  const int h = side(maps.shape(2)), w = side(maps.shape(3));
  if (h < 1 || w < 1 || height < 1 || width < 1) throw std::invalid_argument("sizes must be positive");
  if (lo.ndim() != 1 || lo.shape(0) != n_units) throw std::invalid_argument("one lower threshold per unit");
  if (hi && (hi->ndim() != 1 || hi->shape(0) != n_units))
    throw std::invalid_argument("one upper threshold per unit");
  const py::ssize_t words_per_map = (py::ssize_t(height) * width + 63) / 64;
  py::array_t<uint64_t> words({n_images, n_units, words_per_map});
  py::array_t<int32_t> counts({n_images, n_units});
  const float* in = maps.data();
  const double* low = lo.data();
  const double* high = hi ? hi->data() : nullptr;
  uint64_t* w_out = words.mutable_data();
  int32_t* c_out = counts.mutable_data();
  {
    py::gil_scoped_release release;
    upsample_threshold(in, n_images * n_units, n_units, h, w, low, high, height, width, w_out, c_out);
  }
  return py::make_tuple(words, counts);
}

}  // namespace

void register_upsample(py::module_& m) {
  m.def("bilinear_resize", &run_bilinear_resize, py::arg("maps"), py::arg("height"), py::arg("width"),
        "Resize float32 maps (n, h, w) exactly as Pillow's Image.resize(BILINEAR) on mode F.");
  m.def("upsample_threshold", &run_upsample_threshold, py::arg("maps"), py::arg("lo"), py::arg("hi"),
        py::arg("height"), py::arg("width"),
        "Upsample (images, units, h, w) maps and threshold lo < v (< hi) into packed bits.");
}

}  // namespace pyneuron::bindings
