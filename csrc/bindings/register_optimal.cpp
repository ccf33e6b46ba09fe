#include <algorithm>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "bindings.hpp"
#include "optimal.hpp"

namespace pyneuron::bindings {

namespace {

// Same layout as beam_search's dict with a beam of one, plus the audit columns.
py::dict run_optimal_search(const PyMaskSet& units, int64_t begin, int64_t end, const PyMaskSet& concepts,
                            int length, const std::vector<int>& ops, int beam_size, double time_limit,
                            int64_t max_nodes) {
  OptimalOptions options;
  options.length = length;
  options.beam_size = beam_size;
  options.time_limit = time_limit;
  if (max_nodes < 0) throw std::invalid_argument("max_nodes must be >= 0");
  options.max_nodes = static_cast<uint64_t>(max_nodes);
  options.ops.clear();
  for (int code : ops) {
    if (code < 0 || code > 3) throw std::invalid_argument("unknown operator code " + std::to_string(code));
    options.ops.push_back(static_cast<BinaryOp>(code));
  }
  std::vector<OptimalResult> results;
  {
    py::gil_scoped_release release;
    results = optimal_search(units.view, begin, end, concepts.view, options);
  }
  const py::ssize_t n = static_cast<py::ssize_t>(results.size()), len = length;
  py::array_t<int32_t> concepts_out({n, py::ssize_t(1), len});
  py::array_t<int8_t> ops_out({n, py::ssize_t(1), std::max<py::ssize_t>(len - 1, 0)});
  py::array_t<int32_t> formula_length({n, py::ssize_t(1)});
  py::array_t<double> score({n, py::ssize_t(1)}), iou({n, py::ssize_t(1)});
  py::array_t<int64_t> inter({n, py::ssize_t(1)}), size({n, py::ssize_t(1)});
  py::array_t<int64_t> inter_images({n, py::ssize_t(1)}), size_images({n, py::ssize_t(1)});
  py::array_t<int32_t> beam_count(n), primitive(n);
  py::array_t<double> primitive_iou(n), upper_bound(n), seconds(n);
  py::array_t<int64_t> unit_size(n), unit_images(n), nodes(n);
  py::array_t<bool> optimal(n);
  std::fill_n(concepts_out.mutable_data(), concepts_out.size(), -1);
  std::fill_n(ops_out.mutable_data(), ops_out.size(), int8_t(-1));
  auto c = concepts_out.mutable_unchecked<3>();
  auto o = ops_out.mutable_unchecked<3>();
  for (py::ssize_t u = 0; u < n; ++u) {
    const OptimalResult& r = results[u];
    const BeamEntry& e = r.best;
    const bool found = !e.concepts.empty();
    beam_count.mutable_at(u) = found ? 1 : 0;
    for (std::size_t j = 0; j < e.concepts.size(); ++j) c(u, 0, j) = e.concepts[j];
    for (std::size_t j = 0; j < e.ops.size(); ++j) o(u, 0, j) = static_cast<int8_t>(e.ops[j]);
    formula_length.mutable_at(u, 0) = e.length;
    score.mutable_at(u, 0) = found ? e.score : std::numeric_limits<double>::quiet_NaN();
    iou.mutable_at(u, 0) = found ? e.iou : std::numeric_limits<double>::quiet_NaN();
    inter.mutable_at(u, 0) = static_cast<int64_t>(e.intersection);
    size.mutable_at(u, 0) = static_cast<int64_t>(e.size);
    inter_images.mutable_at(u, 0) = static_cast<int64_t>(e.intersection_images);
    size_images.mutable_at(u, 0) = static_cast<int64_t>(e.size_images);
    primitive.mutable_at(u) = r.primitive;
    primitive_iou.mutable_at(u) = r.primitive_iou;
    unit_size.mutable_at(u) = static_cast<int64_t>(r.unit_size);
    unit_images.mutable_at(u) = static_cast<int64_t>(r.unit_images);
    optimal.mutable_at(u) = r.optimal;
    upper_bound.mutable_at(u) = r.upper_bound;
    nodes.mutable_at(u) = static_cast<int64_t>(r.nodes);
    seconds.mutable_at(u) = r.seconds;
  }
  py::dict out;
  out["concepts"] = concepts_out;
  out["ops"] = ops_out;
  out["length"] = formula_length;
  out["score"] = score;
  out["iou"] = iou;
  out["intersection"] = inter;
  out["size"] = size;
  out["intersection_images"] = inter_images;
  out["size_images"] = size_images;
  out["beam_count"] = beam_count;
  out["primitive"] = primitive;
  out["primitive_iou"] = primitive_iou;
  out["unit_size"] = unit_size;
  out["unit_images"] = unit_images;
  out["optimal"] = optimal;
  out["upper_bound"] = upper_bound;
  out["nodes"] = nodes;
  out["seconds"] = seconds;
  return out;
}

}  // namespace

void register_optimal(py::module_& m) {
  m.def("optimal_search", &run_optimal_search, py::arg("units"), py::arg("begin"), py::arg("end"),
        py::arg("concepts"), py::arg("length"), py::arg("ops"), py::arg("beam_size"), py::arg("time_limit"),
        py::arg("max_nodes"),
        "Exact branch and bound for units [begin, end); returns beam_search's dict (a beam of one) plus "
        "optimal, upper_bound, nodes and seconds.");
}

}  // namespace pyneuron::bindings
