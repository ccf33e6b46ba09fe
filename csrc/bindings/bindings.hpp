// Shared declarations of the pybind11 module `pyneuron._core`.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <vector>

#include "mask_set.hpp"
#include "search.hpp"

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

using CooccurrenceTable = py::array_t<uint64_t, py::array::c_style>;
// The data of concept_cooccurrence's table for `concepts` (null if none); checks its shape.
const uint64_t* cooccurrence_data(const std::optional<CooccurrenceTable>& table, const PyMaskSet& concepts);
// Operators from their codes (0 OR, 1 AND, 2 AND NOT, 3 OR NOT); throws on others.
std::vector<BinaryOp> to_ops(const std::vector<int>& codes);
// beam_search's result arrays: (units, beam_size, length) concepts and so on.
py::dict beam_dict(const std::vector<UnitResult>& results, int beam_size, int length);

void register_masks(py::module_& m);
void register_netdissect(py::module_& m);
void register_search(py::module_& m);
void register_optimal(py::module_& m);
void register_upsample(py::module_& m);

}  // namespace pyneuron::bindings
