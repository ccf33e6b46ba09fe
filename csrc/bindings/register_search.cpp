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

py::dict run_beam_search(const PyMaskSet& units, int64_t begin, int64_t end, const PyMaskSet& concepts,
                         int length, int beam_size, const std::vector<int>& ops, double penalty,
                         const std::optional<CooccurrenceTable>& cooccurrence,
                         std::size_t block_bytes) {
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
  py::dict out = beam_dict(results, beam_size, length);
  out["count_seconds"] = stats.count_seconds;
  out["count_words"] = stats.count_words;
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

py::dict beam_dict(const std::vector<UnitResult>& results, int beam_size, int length) {
  const py::ssize_t n = static_cast<py::ssize_t>(results.size());
  const py::ssize_t b = beam_size, len = length;
  py::array_t<int32_t> concepts_out({n, b, len});
  py::array_t<int8_t> ops_out({n, b, std::max<py::ssize_t>(len - 1, 0)});
  py::array_t<int32_t> formula_length({n, b});
  py::array_t<double> score({n, b}), iou({n, b});
  py::array_t<int64_t> inter({n, b}), size({n, b}), inter_images({n, b}), size_images({n, b});
  py::array_t<int32_t> beam_count(n), primitive(n);
  py::array_t<double> primitive_iou(n);
  py::array_t<int64_t> unit_size(n), unit_images(n), pruned(n), counted(n), derived(n), words(n);
  std::fill_n(concepts_out.mutable_data(), concepts_out.size(), -1);
  std::fill_n(ops_out.mutable_data(), ops_out.size(), int8_t(-1));
  std::fill_n(formula_length.mutable_data(), formula_length.size(), 0);
  std::fill_n(score.mutable_data(), score.size(), std::numeric_limits<double>::quiet_NaN());
  std::fill_n(iou.mutable_data(), iou.size(), std::numeric_limits<double>::quiet_NaN());
  for (auto* arr : {&inter, &size, &inter_images, &size_images}) std::fill_n(arr->mutable_data(), arr->size(), 0);
  auto c = concepts_out.mutable_unchecked<3>();
  auto o = ops_out.mutable_unchecked<3>();
  for (py::ssize_t u = 0; u < n; ++u) {
    const UnitResult& r = results[u];
    beam_count.mutable_at(u) = static_cast<int32_t>(r.beam.size());
    primitive.mutable_at(u) = r.primitive;
    primitive_iou.mutable_at(u) = r.primitive_iou;
    unit_size.mutable_at(u) = static_cast<int64_t>(r.unit_size);
    unit_images.mutable_at(u) = static_cast<int64_t>(r.unit_images);
    pruned.mutable_at(u) = static_cast<int64_t>(r.pruned);
    counted.mutable_at(u) = static_cast<int64_t>(r.counted);
    words.mutable_at(u) = static_cast<int64_t>(r.words);
    derived.mutable_at(u) = static_cast<int64_t>(r.derived);
    for (py::ssize_t k = 0; k < static_cast<py::ssize_t>(r.beam.size()); ++k) {
      const BeamEntry& e = r.beam[k];
      for (std::size_t j = 0; j < e.concepts.size(); ++j) c(u, k, j) = e.concepts[j];
      for (std::size_t j = 0; j < e.ops.size(); ++j) o(u, k, j) = static_cast<int8_t>(e.ops[j]);
      formula_length.mutable_at(u, k) = e.length;
      score.mutable_at(u, k) = e.score;
      iou.mutable_at(u, k) = e.iou;
      inter.mutable_at(u, k) = static_cast<int64_t>(e.intersection);
      size.mutable_at(u, k) = static_cast<int64_t>(e.size);
      inter_images.mutable_at(u, k) = static_cast<int64_t>(e.intersection_images);
      size_images.mutable_at(u, k) = static_cast<int64_t>(e.size_images);
    }
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
  out["pruned"] = pruned;
  out["counted"] = counted;
  out["words"] = words;
  out["derived"] = derived;
  return out;
}

namespace {

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
  m.attr("max_length") = kMaxLength;
  m.attr("max_beam_size") = kMaxBeamSize;
  m.def("beam_search", &run_beam_search, py::arg("units"), py::arg("begin"), py::arg("end"), py::arg("concepts"),
        py::arg("length"), py::arg("beam_size"), py::arg("ops"), py::arg("penalty"),
        py::arg("cooccurrence") = py::none(), py::arg("block_bytes") = std::size_t(128) << 20,
        "Exact compositional beam search for units [begin, end); returns a dict of arrays.");
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
