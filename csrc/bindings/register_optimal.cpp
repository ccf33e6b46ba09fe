#include <stdexcept>
#include <vector>

#include "bindings.hpp"
#include "optimal.hpp"

namespace pyneuron::bindings {

namespace {

// A beam of one per unit, plus optimal, upper_bound, nodes and seconds.
OptimalSearchResult run_optimal_search(const PyMaskSet& units, int64_t begin, int64_t end, const PyMaskSet& concepts,
                                       int length, const std::vector<int>& ops, int beam_size, double time_limit,
                                       int64_t max_nodes, const std::optional<CooccurrenceTable>& cooccurrence) {
  if (max_nodes < 0) throw std::invalid_argument("max_nodes must be >= 0");
  OptimalOptions options;
  options.length = length;
  options.beam_size = beam_size;
  options.time_limit = time_limit;
  options.max_nodes = static_cast<uint64_t>(max_nodes);
  options.ops = to_ops(ops);
  const uint64_t* table = cooccurrence_data(cooccurrence, concepts);
  std::vector<OptimalResult> results;
  {
    py::gil_scoped_release release;
    results = optimal_search(units.view, begin, end, concepts.view, options, table);
  }
  const py::ssize_t n = static_cast<py::ssize_t>(results.size());
  std::vector<UnitResult> best(results.size());
  OptimalSearchResult out;
  out.optimal = CArray<bool>(n);
  out.upper_bound = CArray<double>(n);
  out.nodes = CArray<int64_t>(n);
  out.seconds = CArray<double>(n);
  for (py::ssize_t u = 0; u < n; ++u) {
    OptimalResult& r = results[u];
    if (!r.best.concepts.empty()) best[u].beam.push_back(std::move(r.best));
    best[u].unit_size = r.unit_size;
    best[u].unit_images = r.unit_images;
    best[u].primitive = r.primitive;
    best[u].primitive_iou = r.primitive_iou;
    out.optimal.mutable_at(u) = r.optimal;
    out.upper_bound.mutable_at(u) = r.upper_bound;
    out.nodes.mutable_at(u) = static_cast<int64_t>(r.nodes);
    out.seconds.mutable_at(u) = r.seconds;
  }
  static_cast<SearchResult&>(out) = search_result(best, 1, length);
  return out;
}

}  // namespace

void register_optimal(py::module_& m) {
  m.def("optimal_search", &run_optimal_search, py::arg("units"), py::arg("begin"), py::arg("end"),
        py::arg("concepts"), py::arg("length"), py::arg("ops"), py::arg("beam_size"), py::arg("time_limit"),
        py::arg("max_nodes"), py::arg("cooccurrence") = py::none(),
        "Exact branch and bound for units [begin, end): an OptimalSearchResult (a beam of one, plus "
        "optimal, upper_bound, nodes and seconds).");
}

}  // namespace pyneuron::bindings
