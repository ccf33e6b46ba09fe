#include <algorithm>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "bindings.hpp"
#include "search.hpp"

namespace pyneuron::bindings {

namespace {

BinaryOp to_op(int code) {
  if (code < 0 || code > 3) throw std::invalid_argument("unknown operator code " + std::to_string(code));
  return static_cast<BinaryOp>(code);
}

SearchResult run_beam_search(const PyMaskSet& units, int64_t begin, int64_t end, const PyMaskSet& concepts,
                             int length, int beam_size, const std::vector<int>& ops, double penalty,
                             const std::optional<CooccurrenceTable>& cooccurrence, std::size_t block_bytes) {
  const uint64_t* table = cooccurrence_data(cooccurrence, concepts);
  SearchOptions options;
  options.length = length;
  options.beam_size = beam_size;
  options.penalty = penalty;
  options.block_bytes = block_bytes;
  options.ops = to_ops(ops);
  std::vector<UnitResult> results;
  SearchStats stats;
  {
    py::gil_scoped_release release;
    results = beam_search(units.view, begin, end, concepts.view, options, table, &stats);
  }
  SearchResult out = search_result(results, beam_size, length);
  out.count_seconds = stats.count_seconds;
  out.count_words = static_cast<int64_t>(stats.count_words);
  return out;
}

}  // namespace

const uint64_t* cooccurrence_data(const std::optional<CooccurrenceTable>& table, const PyMaskSet& concepts) {
  if (!table) return nullptr;
  const py::ssize_t n = static_cast<py::ssize_t>(concepts.view.n_masks);
  if (table->ndim() != 2 || table->shape(0) != n || table->shape(1) != n)
    throw std::invalid_argument("cooccurrence must be a (concepts, concepts) uint64 table of this store");
  return table->data();
}

std::vector<BinaryOp> to_ops(const std::vector<int>& codes) {
  std::vector<BinaryOp> ops;
  for (int code : codes) ops.push_back(to_op(code));
  return ops;
}

SearchResult search_result(const std::vector<UnitResult>& results, int beam_size, int length) {
  const py::ssize_t n = static_cast<py::ssize_t>(results.size());
  const py::ssize_t b = beam_size, len = length;
  SearchResult out;
  out.concepts = CArray<int32_t>({n, b, len});
  out.ops = CArray<int8_t>({n, b, std::max<py::ssize_t>(len - 1, 0)});
  out.length = CArray<int32_t>({n, b});
  out.score = CArray<double>({n, b});
  out.iou = CArray<double>({n, b});
  for (auto* arr : {&out.intersection, &out.size, &out.intersection_images, &out.size_images})
    *arr = CArray<int64_t>({n, b});
  out.beam_count = CArray<int32_t>(n);
  out.primitive = CArray<int32_t>(n);
  out.primitive_iou = CArray<double>(n);
  for (auto* arr : {&out.unit_size, &out.unit_images, &out.pruned, &out.counted, &out.derived, &out.words})
    *arr = CArray<int64_t>(n);
  std::fill_n(out.concepts.mutable_data(), out.concepts.size(), -1);
  std::fill_n(out.ops.mutable_data(), out.ops.size(), int8_t(-1));
  std::fill_n(out.length.mutable_data(), out.length.size(), 0);
  std::fill_n(out.score.mutable_data(), out.score.size(), std::numeric_limits<double>::quiet_NaN());
  std::fill_n(out.iou.mutable_data(), out.iou.size(), std::numeric_limits<double>::quiet_NaN());
  for (auto* arr : {&out.intersection, &out.size, &out.intersection_images, &out.size_images})
    std::fill_n(arr->mutable_data(), arr->size(), 0);
  auto c = out.concepts.mutable_unchecked<3>();
  auto o = out.ops.mutable_unchecked<3>();
  for (py::ssize_t u = 0; u < n; ++u) {
    const UnitResult& r = results[u];
    out.beam_count.mutable_at(u) = static_cast<int32_t>(r.beam.size());
    out.primitive.mutable_at(u) = r.primitive;
    out.primitive_iou.mutable_at(u) = r.primitive_iou;
    out.unit_size.mutable_at(u) = static_cast<int64_t>(r.unit_size);
    out.unit_images.mutable_at(u) = static_cast<int64_t>(r.unit_images);
    out.pruned.mutable_at(u) = static_cast<int64_t>(r.pruned);
    out.counted.mutable_at(u) = static_cast<int64_t>(r.counted);
    out.words.mutable_at(u) = static_cast<int64_t>(r.words);
    out.derived.mutable_at(u) = static_cast<int64_t>(r.derived);
    for (py::ssize_t k = 0; k < static_cast<py::ssize_t>(r.beam.size()); ++k) {
      const BeamEntry& e = r.beam[k];
      for (std::size_t j = 0; j < e.concepts.size(); ++j) c(u, k, j) = e.concepts[j];
      for (std::size_t j = 0; j < e.ops.size(); ++j) o(u, k, j) = static_cast<int8_t>(e.ops[j]);
      out.length.mutable_at(u, k) = e.length;
      out.score.mutable_at(u, k) = e.score;
      out.iou.mutable_at(u, k) = e.iou;
      out.intersection.mutable_at(u, k) = static_cast<int64_t>(e.intersection);
      out.size.mutable_at(u, k) = static_cast<int64_t>(e.size);
      out.intersection_images.mutable_at(u, k) = static_cast<int64_t>(e.intersection_images);
      out.size_images.mutable_at(u, k) = static_cast<int64_t>(e.size_images);
    }
  }
  return out;
}

namespace {

// -- the result classes --------------------------------------------------------------------

// The shape of a result field, from the number of units, the beam and the formula length.
enum class Axes { Units, Beam, Formula, Operators };

// Every field of the result classes, in FIELDS order: visit(name, member, axes, doc).
template <typename Result>
struct ResultFields;

template <>
struct ResultFields<SearchResult> {
  template <typename Visit>
  static void own(Visit&& visit) {
    using R = SearchResult;
    visit("concepts", &R::concepts, Axes::Formula,
          "int32 (units, beam, length): each formula's concepts, left to right (-1: none).");
    visit("ops", &R::ops, Axes::Operators,
          "int8 (units, beam, length - 1): operator codes between them (0 OR, 1 AND, 2 AND NOT, 3 OR NOT; "
          "-1: none).");
    visit("length", &R::length, Axes::Beam,
          "int32 (units, beam): compexp's formula length (concepts, each NOT one more; 0: no formula).");
    visit("score", &R::score, Axes::Beam, "float64 (units, beam): IoU x penalty^(length - 1) (NaN: no formula).");
    visit("iou", &R::iou, Axes::Beam, "float64 (units, beam): IoU (NaN: no formula).");
    visit("intersection", &R::intersection, Axes::Beam, "int64 (units, beam): |F AND unit|.");
    visit("size", &R::size, Axes::Beam, "int64 (units, beam): |F|.");
    visit("intersection_images", &R::intersection_images, Axes::Beam,
          "int64 (units, beam): images where F AND unit is not empty.");
    visit("size_images", &R::size_images, Axes::Beam, "int64 (units, beam): images where F is not empty.");
    visit("beam_count", &R::beam_count, Axes::Units, "int32 (units,): formulas in the unit's beam.");
    visit("primitive", &R::primitive, Axes::Units, "int32 (units,): best single concept (-1: none).");
    visit("primitive_iou", &R::primitive_iou, Axes::Units, "float64 (units,): its IoU.");
    visit("unit_size", &R::unit_size, Axes::Units, "int64 (units,): |unit|.");
    visit("unit_images", &R::unit_images, Axes::Units, "int64 (units,): images where the unit is not empty.");
    visit("pruned", &R::pruned, Axes::Units,
          "int64 (units,): (formula, concept) pairs excluded by the bounds before counting.");
    visit("counted", &R::counted, Axes::Units, "int64 (units,): pairs scored after counting |F AND C|.");
    visit("derived", &R::derived, Axes::Units, "int64 (units,): pairs scored without counting |F AND C|.");
    visit("words", &R::words, Axes::Units, "int64 (units,): 64-bit word pairs AND-popcounted for the unit.");
  }
  template <typename Visit>
  static void all(Visit&& visit) {
    own(visit);
  }
};

template <>
struct ResultFields<OptimalSearchResult> {
  template <typename Visit>
  static void own(Visit&& visit) {
    using R = OptimalSearchResult;
    visit("optimal", &R::optimal, Axes::Units, "bool (units,): no formula of the search space is better.");
    visit("upper_bound", &R::upper_bound, Axes::Units,
          "float64 (units,): no formula of the search space has a higher IoU.");
    visit("nodes", &R::nodes, Axes::Units, "int64 (units,): formulas whose extensions were examined.");
    visit("seconds", &R::seconds, Axes::Units, "float64 (units,): wall time of the unit.");
  }
  template <typename Visit>
  static void all(Visit&& visit) {
    ResultFields<SearchResult>::all(visit);
    own(visit);
  }
};

template <typename T>
std::string shape_text(const CArray<T>& array) {
  std::string text = "(";
  for (py::ssize_t d = 0; d < array.ndim(); ++d) text += (d ? ", " : "") + std::to_string(array.shape(d));
  return text + (array.ndim() == 1 ? ",)" : ")");
}

// arrays[name] as a C-contiguous array of exactly T's dtype (ValueError: another dtype or
// not an array; KeyError: missing).
template <typename T>
CArray<T> field_array(const py::object& arrays, const char* name) {
  if (!arrays.contains(name)) throw py::key_error(std::string("a search result needs its '") + name + "' array");
  py::object value = arrays[name];
  if (!py::isinstance<py::array_t<T>>(value))
    throw py::value_error(std::string("the search result's '") + name + "' must be a numpy array of dtype " +
                          py::str(py::dtype::of<T>()).cast<std::string>() + ", got " +
                          py::str(py::type::of(value)).cast<std::string>() +
                          (py::isinstance<py::array>(value)
                               ? " of dtype " + py::str(value.attr("dtype")).cast<std::string>()
                               : std::string()));
  return CArray<T>::ensure(value);
}

// A result from its arrays (a mapping of FIELDS to arrays, such as to_arrays() or a
// loaded .npz file): each of its field's dtype, shapes agreeing (ValueError, KeyError).
template <typename Result>
Result result_from_arrays(const py::object& arrays) {
  Result out;
  ResultFields<Result>::all([&](const char* name, auto member, Axes, const char*) {
    using Array = std::remove_reference_t<decltype(out.*member)>;
    out.*member = field_array<typename Array::value_type>(arrays, name);
  });
  if (out.concepts.ndim() != 3) throw py::value_error("a search result's 'concepts' must have 3 dimensions");
  const py::ssize_t n = out.concepts.shape(0), b = out.concepts.shape(1), len = out.concepts.shape(2);
  ResultFields<Result>::all([&](const char* name, auto member, Axes axes, const char*) {
    const auto& array = out.*member;
    std::vector<py::ssize_t> expected{n};
    if (axes != Axes::Units) expected.push_back(b);
    if (axes == Axes::Formula) expected.push_back(len);
    if (axes == Axes::Operators) expected.push_back(std::max<py::ssize_t>(len - 1, 0));
    bool same = array.ndim() == py::ssize_t(expected.size());
    for (py::ssize_t d = 0; same && d < array.ndim(); ++d) same = array.shape(d) == expected[std::size_t(d)];
    if (!same)
      throw py::value_error(std::string("the search result's '") + name + "' has shape " + shape_text(array) +
                            ", which does not agree with 'concepts' " + shape_text(out.concepts));
  });
  return out;
}

template <typename Result>
py::dict result_arrays(const Result& result) {
  py::dict out;
  ResultFields<Result>::all([&](const char* name, auto member, Axes, const char*) { out[name] = result.*member; });
  return out;
}

// Binds Result as `name`: a read-only property per field, FIELDS, to_arrays / from_arrays,
// pickling (for Ray), len() (units) and item access by field name.
template <typename Result, typename... Base>
py::class_<Result, Base...> bind_result(py::module_& m, const char* name, const char* doc) {
  py::class_<Result, Base...> cls(m, name, doc);
  py::list fields;
  ResultFields<Result>::all([&](const char* field, auto, Axes, const char*) { fields.append(field); });
  cls.attr("FIELDS") = py::tuple(fields);
  ResultFields<Result>::own(
      [&](const char* field, auto member, Axes, const char* help) { cls.def_readonly(field, member, help); });
  cls.def("to_arrays", &result_arrays<Result>,
          "The arrays by field name (FIELDS order; the arrays themselves, not copies).");
  cls.def_static("from_arrays", &result_from_arrays<Result>, py::arg("arrays"),
                 "A result from a mapping of every name of FIELDS to its array (to_arrays(), a loaded .npz "
                 "file): ValueError when a dtype or shape does not fit, KeyError when one is missing.");
  cls.def("__len__", [](const Result& r) { return r.concepts.shape(0); }, "Number of units.");
  cls.def("__repr__", [name](const Result& r) {
    return std::string(name) + "(units=" + std::to_string(r.concepts.shape(0)) +
           ", beam=" + std::to_string(r.concepts.shape(1)) + ", length=" + std::to_string(r.concepts.shape(2)) + ")";
  });
  cls.def(py::pickle([](const Result& r) { return py::make_tuple(result_arrays(r), r.count_seconds, r.count_words); },
                     [](const py::tuple& state) {
                       if (state.size() != 3) throw std::runtime_error("invalid search result state");
                       Result r = result_from_arrays<Result>(state[0]);
                       r.count_seconds = state[1].cast<double>();
                       r.count_words = state[2].cast<int64_t>();
                       return r;
                     }));
  return cls;
}

void register_results(py::module_& m) {
  bind_result<SearchResult>(
      m, "SearchResult",
      "What beam_search returns: per-unit numpy arrays, unit first, for each unit's final beam "
      "(best first). FIELDS names them; result[name] is getattr(result, name).")
      .def_readonly("count_seconds", &SearchResult::count_seconds,
                    "Wall time of the call's batched counting passes (beam search; 0 otherwise).")
      .def_readonly("count_words", &SearchResult::count_words, "64-bit word pairs AND-popcounted in them.")
      .def("__getitem__", [](const py::object& self, const std::string& name) -> py::object {
        const py::tuple fields = self.attr("FIELDS");
        if (!fields.contains(name) && name != "count_seconds" && name != "count_words") throw py::key_error(name);
        return self.attr(name.c_str());
      });
  bind_result<OptimalSearchResult, SearchResult>(
      m, "OptimalSearchResult",
      "What optimal_search returns: a SearchResult with a beam of one, plus per unit optimal, "
      "upper_bound, nodes and seconds.");
}

// -- the functions -------------------------------------------------------------------------

py::object run_concept_cooccurrence(const PyMaskSet& concepts, bool with_stats) {
  const py::ssize_t n = static_cast<py::ssize_t>(concepts.view.n_masks);
  py::array_t<uint64_t> out({n, n});
  uint64_t* data = out.mutable_data();
  SearchStats stats;
  {
    py::gil_scoped_release release;
    concept_cooccurrence(concepts.view, data, &stats);
  }
  if (!with_stats) return std::move(out);
  return py::make_tuple(out, stats.count_seconds, stats.count_words);
}

py::array_t<int64_t> run_intersection_counts(const PyMaskSet& units, int64_t begin, int64_t end,
                                             const PyMaskSet& concepts) {
  if (begin < 0 || end > units.view.n_masks || begin > end) throw std::invalid_argument("unit range out of bounds");
  py::array_t<int64_t> out({static_cast<py::ssize_t>(end - begin), static_cast<py::ssize_t>(concepts.view.n_masks)});
  int64_t* data = out.mutable_data();
  py::gil_scoped_release release;
  intersection_counts(units.view, begin, end, concepts.view, data);
  return out;
}

py::array_t<uint64_t> run_evaluate_words(const std::vector<int32_t>& program, const PyMaskSet& concepts) {
  std::vector<uint64_t> words;
  {
    py::gil_scoped_release release;
    words = evaluate(program, concepts.view).to_words();
  }
  const Grid& g = concepts.view.grid;
  py::array_t<uint64_t> out({static_cast<py::ssize_t>(g.n_images), static_cast<py::ssize_t>(g.words_per_image)});
  std::copy(words.begin(), words.end(), out.mutable_data());
  return out;
}

py::dict run_formula_counts(const std::vector<int32_t>& program, const PyMaskSet& concepts, const PyMaskSet& units) {
  const py::ssize_t n = static_cast<py::ssize_t>(units.view.n_masks);
  py::array_t<uint64_t> inter(n), inter_images(n);
  uint64_t size = 0, size_images = 0;
  {
    uint64_t* i = inter.mutable_data();
    uint64_t* ii = inter_images.mutable_data();
    py::gil_scoped_release release;
    const SparseMask formula = evaluate(program, concepts.view);
    size = formula.total();
    size_images = formula.nonempty_images();
    formula_counts(formula, units.view, i, ii);
  }
  py::dict out;
  out["intersection"] = inter;
  out["intersection_images"] = inter_images;
  out["size"] = size;
  out["size_images"] = size_images;
  return out;
}

}  // namespace

void register_search(py::module_& m) {
  register_results(m);
  m.attr("max_length") = kMaxLength;
  m.attr("max_beam_size") = kMaxBeamSize;
  m.def("beam_search", &run_beam_search, py::arg("units"), py::arg("begin"), py::arg("end"), py::arg("concepts"),
        py::arg("length"), py::arg("beam_size"), py::arg("ops"), py::arg("penalty"),
        py::arg("cooccurrence") = py::none(), py::arg("block_bytes") = std::size_t(128) << 20,
        "Exact compositional beam search for units [begin, end): a SearchResult.");
  m.def("concept_cooccurrence", &run_concept_cooccurrence, py::arg("concepts"), py::arg("with_stats") = false,
        "|concept c AND concept d| for every pair: a symmetric (concepts, concepts) uint64 table "
        "(with_stats: also the seconds and word pairs of its counting passes).");
  m.def("intersection_counts", &run_intersection_counts, py::arg("units"), py::arg("begin"), py::arg("end"),
        py::arg("concepts"), "|unit AND concept| for units [begin, end) and every concept.");
  m.def("evaluate_words", &run_evaluate_words, py::arg("program"), py::arg("concepts"),
        "Dense per-image words of a postfix formula program.");
  m.def("formula_counts", &run_formula_counts, py::arg("program"), py::arg("concepts"), py::arg("units"),
        "Counts of one formula against every unit.");
}

}  // namespace pyneuron::bindings
