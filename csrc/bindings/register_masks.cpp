#include <stdexcept>
#include <string>

#include "bindings.hpp"

namespace pyneuron::bindings {

namespace {

void require_1d(const py::array& a, const char* name) {
  if (a.ndim() != 1) throw std::invalid_argument(std::string(name) + " must be one-dimensional");
}

PyMaskSet make_mask_set(uint64_t n_images, uint64_t pixels, CArray<int64_t> offsets, CArray<int32_t> images,
                        CArray<int64_t> slots, CArray<int32_t> counts, CArray<uint64_t> words) {
  require_1d(offsets, "offsets");
  require_1d(images, "images");
  require_1d(slots, "slots");
  require_1d(counts, "counts");
  require_1d(words, "words");
  if (offsets.size() < 1) throw std::invalid_argument("offsets must hold at least one value");
  if (images.size() != slots.size() || images.size() != counts.size())
    throw std::invalid_argument("images, slots and counts must have the same length");
  PyMaskSet set{offsets, images, slots, counts, words, MaskSetView{}};
  MaskSetView& v = set.view;
  if (pixels == 0) throw std::invalid_argument("an image must have at least one pixel");
  v.grid = Grid(n_images, pixels);
  if (uint64_t(words.size()) % v.grid.words_per_image != 0)
    throw std::invalid_argument("words length is not a multiple of the words per image");
  v.n_masks = offsets.size() - 1;
  v.offsets = set.offsets.data();
  v.images = set.images.data();
  v.slots = set.slots.data();
  v.counts = set.counts.data();
  v.words = set.words.data();
  v.n_entries = images.size();
  v.n_slots = int64_t(uint64_t(words.size()) / v.grid.words_per_image);
  v.validate();
  return set;
}

}  // namespace

void register_masks(py::module_& m) {
  py::class_<PyMaskSet>(m, "MaskSet", "Block-sparse masks on one grid (CSR arrays, viewed, not copied).")
      .def(py::init(&make_mask_set), py::arg("n_images"), py::arg("pixels"), py::arg("offsets"),
           py::arg("images"), py::arg("slots"), py::arg("counts"), py::arg("words"))
      .def_property_readonly("n_masks", [](const PyMaskSet& s) { return s.view.n_masks; })
      .def_property_readonly("n_images", [](const PyMaskSet& s) { return s.view.grid.n_images; })
      .def_property_readonly("pixels", [](const PyMaskSet& s) { return s.view.grid.pixels; })
      .def("verify_words", [](const PyMaskSet& s) {
        py::gil_scoped_release release;
        s.view.verify_words();
      }, "Check every bitset's popcount and padding against the stored counts.");
}

}  // namespace pyneuron::bindings
