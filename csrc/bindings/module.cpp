#include "bindings.hpp"
#include "popcount.hpp"
#include "thread_pool.hpp"

namespace pyneuron::bindings {

PYBIND11_MODULE(_core, m) {
  m.doc() = "pyneuron's C++ engine (use the pyneuron package, not this module).";
  m.def("available_simd_levels", &available_simd_levels, "SIMD levels this CPU and build support.");
  m.def("simd_level", &simd_level, "The SIMD level in use.");
  m.def("set_simd_level", &set_simd_level, py::arg("level"), "Select a SIMD level by name.");
  m.def(
      "and_popcount_throughput",
      [](std::size_t words, double seconds) {
        py::gil_scoped_release release;
        return and_popcount_throughput(words, seconds);
      },
      py::arg("words"), py::arg("seconds"),
      "In-cache AND+popcount bytes/s of one core at the current SIMD level (for benchmarks).");
  m.def("num_threads", &num_threads, "Worker threads used by the engine.");
  m.def("set_num_threads", &set_num_threads, py::arg("n"), "Set the number of worker threads.");
  m.def("max_threads", &max_threads, "Largest number of worker threads set_num_threads accepts.");
  register_masks(m);
  register_netdissect(m);
  register_search(m);
  register_optimal(m);
  register_upsample(m);
}

}  // namespace pyneuron::bindings
