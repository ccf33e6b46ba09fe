// Parallel-for over a pool of std::threads kept between calls (no OpenMP: torch ships
// its own runtime).
#pragma once
#include <cstdint>
#include <functional>

namespace pyneuron {

// Number of worker threads used by parallel_for (default: hardware concurrency,
// or PYNEURON_NUM_THREADS from the environment, capped at max_threads()).
int num_threads();
// Throws std::invalid_argument unless 1 <= n <= max_threads().
void set_num_threads(int n);

// Largest thread setting: 4 per CPU, and at least kMinThreadCap. The engine's work is
// CPU-bound, so threads beyond the CPUs only add context switches, and each one
// reserves a stack (8 MiB of address space by default): without a cap, a setting of
// hundreds exhausts a limited address space (RLIMIT_AS, a batch job's memory limit).
constexpr int kMinThreadCap = 512;
int max_threads();

// Calls body(i) for every i in [0, n), spread over num_threads() threads (fewer when
// the system refuses to start more: the calling thread alone if need be). Runs in the
// calling thread when nested in a body or while another thread's call holds the pool.
// The first exception thrown by a body is rethrown after all threads stop.
void parallel_for(int64_t n, const std::function<void(int64_t)>& body);

}  // namespace pyneuron
