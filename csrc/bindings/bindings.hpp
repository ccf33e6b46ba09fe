// Shared declarations of the pybind11 module `pyneuron._core`.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "mask_set.hpp"

namespace pyneuron::bindings {

namespace py = pybind11;

template <typename T>
using CArray = py::array_t<T, py::array::c_style | py::array::forcecast>;

// A MaskSetView that owns references to the numpy arrays (possibly memory-mapped) it views.
struct PyMaskSet {
  CArray<int64_t> offsets;
  CArray<int32_t> images;
  CArray<int64_t> slots;
  CArray<int32_t> counts;
  CArray<uint64_t> words;
  MaskSetView view;
};

void register_masks(py::module_& m);
void register_search(py::module_& m);
void register_optimal(py::module_& m);
void register_upsample(py::module_& m);

}  // namespace pyneuron::bindings
