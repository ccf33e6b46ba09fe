// Shared declarations of the pybind11 module `pyneuron.engine._core`.
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
// What beam_search returns to Python (the class SearchResult): per-unit arrays, unit first,
// for a beam of `beam` formulas of at most `length` concepts. Each field is listed once,
// in register_search.cpp's visit_fields (Python's SearchResult.FIELDS).
struct SearchResult {
  CArray<int32_t> concepts;             // (units, beam, length): concept ids, left to right; -1: none
  CArray<int8_t> ops;                   // (units, beam, length - 1): operator codes; -1: none
  CArray<int32_t> length;               // (units, beam): compexp's length (NOT counts one more); 0: none
  CArray<double> score;                 // (units, beam): NaN beyond beam_count
  CArray<double> iou;                   // (units, beam): NaN beyond beam_count
  CArray<int64_t> intersection;         // (units, beam): |F AND A|
  CArray<int64_t> size;                 // (units, beam): |F|
  CArray<int64_t> intersection_images;  // (units, beam): images where F AND A is not empty
  CArray<int64_t> size_images;          // (units, beam): images where F is not empty
  CArray<int32_t> beam_count;           // (units,): formulas in the beam
  CArray<int32_t> primitive;            // (units,): best single concept, -1: none
  CArray<double> primitive_iou;         // (units,)
  CArray<int64_t> unit_size;            // (units,): |A|
  CArray<int64_t> unit_images;          // (units,): images where A is not empty
  CArray<int64_t> pruned;               // (units,): UnitResult's counters
  CArray<int64_t> counted;
  CArray<int64_t> derived;
  CArray<int64_t> words;
  // Of the whole call (beam search only): its counting passes' wall time and word pairs.
  double count_seconds = 0.0;
  int64_t count_words = 0;
};

// What optimal_search returns (the class OptimalSearchResult): a beam of one, plus per unit
// whether it is proven optimal, the bound, and the work.
struct OptimalSearchResult : SearchResult {
  CArray<bool> optimal;        // (units,)
  CArray<double> upper_bound;  // (units,)
  CArray<int64_t> nodes;       // (units,)
  CArray<double> seconds;      // (units,)
};

// The result arrays of units' searches with a beam of `beam_size` formulas of at most
// `length` concepts (the GIL held).
SearchResult search_result(const std::vector<UnitResult>& results, int beam_size, int length);

void register_masks(py::module_& m);
void register_netdissect(py::module_& m);
void register_search(py::module_& m);
void register_optimal(py::module_& m);
void register_upsample(py::module_& m);

}  // namespace pyneuron::bindings
