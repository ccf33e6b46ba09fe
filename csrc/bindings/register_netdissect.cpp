#include <stdexcept>

#include "bindings.hpp"
#include "category_pixels.hpp"

namespace pyneuron::bindings {

namespace {

py::array_t<int64_t> run_category_unit_pixels(const PyMaskSet& units, int64_t begin, int64_t end,
                                              const PyMaskSet& concepts, const CArray<int32_t>& category,
                                              int32_t n_categories) {
  if (category.ndim() != 1 || category.shape(0) != concepts.view.n_masks)
    throw std::invalid_argument("one category code per concept");
  if (begin < 0 || end > units.view.n_masks || begin > end) throw std::invalid_argument("unit range out of bounds");
  py::array_t<int64_t> out({static_cast<py::ssize_t>(end - begin), static_cast<py::ssize_t>(n_categories)});
  int64_t* data = out.mutable_data();
  const int32_t* codes = category.data();
  py::gil_scoped_release release;
  category_unit_pixels(units.view, begin, end, concepts.view, codes, n_categories, data);
  return out;
}

}  // namespace

void register_netdissect(py::module_& m) {
  m.def("category_unit_pixels", &run_category_unit_pixels, py::arg("units"), py::arg("begin"), py::arg("end"),
        py::arg("concepts"), py::arg("category"), py::arg("n_categories"),
        "Per unit and category: the unit's pixels in images where a concept of the category meets it.");
}

}  // namespace pyneuron::bindings
