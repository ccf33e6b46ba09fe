#include "thread_pool.hpp"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

namespace pyneuron {

namespace {
int default_threads() {
  if (const char* env = std::getenv("PYNEURON_NUM_THREADS"); env != nullptr && *env != '\0') {
    const int n = std::atoi(env);
    if (n > 0) return n;
  }
  return std::max(1u, std::thread::hardware_concurrency());
}
std::atomic<int>& thread_setting() {
  static std::atomic<int> n{default_threads()};
  return n;
}
}  // namespace

int num_threads() { return thread_setting().load(); }

void set_num_threads(int n) {
  if (n < 1) throw std::invalid_argument("number of threads must be at least 1");
  thread_setting().store(n);
}

void parallel_for(int64_t n, const std::function<void(int64_t)>& body) {
  const int64_t workers = std::min<int64_t>(num_threads(), n);
  if (workers <= 1) {
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
  std::atomic<int64_t> next{0};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto work = [&] {
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) {
      try {
        body(i);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
        next.store(n);
      }
    }
  };
  std::vector<std::thread> threads;
  try {
    threads.reserve(std::size_t(workers - 1));
    for (int64_t t = 1; t < workers; ++t) threads.emplace_back(work);
  } catch (const std::exception&) {
    // No thread could be started (std::system_error: no memory for a stack, a
    // process limit) or no room for its handle: the shared counter lets the
    // threads already running, and this one, do all the work.
  }
  work();
  for (std::thread& t : threads) t.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace pyneuron
