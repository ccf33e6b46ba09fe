// Parallel-for over a pool of std::threads kept between calls (no OpenMP: torch ships
// its own runtime).
#pragma once
#include <cstdint>
#include <functional>

namespace pyneuron {

// Number of worker threads used by parallel_for (default: hardware concurrency,
// or PYNEURON_NUM_THREADS from the environment).
int num_threads();
void set_num_threads(int n);

// Calls body(i) for every i in [0, n), spread over num_threads() threads (fewer when
// the system refuses to start more: the calling thread alone if need be). Runs in the
// calling thread when nested in a body or while another thread's call holds the pool.
// The first exception thrown by a body is rethrown after all threads stop.
void parallel_for(int64_t n, const std::function<void(int64_t)>& body);

}  // namespace pyneuron
