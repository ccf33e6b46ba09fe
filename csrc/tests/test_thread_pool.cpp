// The thread pool: parallel_for runs every index exactly once, with 1 and several threads,
// nested, from two callers at once, and after a body threw.
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "check.hpp"
#include "thread_pool.hpp"

using namespace pyneuron_test;

namespace {

const int kThreadSettings[] = {1, 2, 3, 8};
const int64_t kSizes[] = {0, 1, 2, 3, 7, 64, 1000, 100000};

struct KeepThreads {
  int saved = pyneuron::num_threads();
  ~KeepThreads() { pyneuron::set_num_threads(saved); }
};

// Runs parallel_for(n) and checks each index ran once (none outside [0, n)); returns the
// threads that ran bodies.
std::set<std::thread::id> run_and_check(int64_t n) {
  std::unique_ptr<std::atomic<int>[]> hits(new std::atomic<int>[std::size_t(n) + 1]);
  for (int64_t i = 0; i < n; ++i) hits[i].store(0);
  std::atomic<int64_t> outside{0};
  std::mutex mutex;
  std::set<std::thread::id> threads;
  pyneuron::parallel_for(n, [&](int64_t i) {
    if (i < 0 || i >= n) {
      outside.fetch_add(1);
      return;
    }
    hits[i].fetch_add(1);
    std::lock_guard<std::mutex> lock(mutex);
    threads.insert(std::this_thread::get_id());
  });
  CHECK_EQ(outside.load(), int64_t(0));
  int64_t wrong = 0, first_wrong = -1;
  for (int64_t i = 0; i < n; ++i)
    if (hits[i].load() != 1) {
      if (first_wrong < 0) first_wrong = i;
      ++wrong;
    }
  CHECK_EQ(wrong, int64_t(0));
  if (wrong != 0) CHECK_EQ(hits[first_wrong].load(), 1);
  return threads;
}

}  // namespace

TEST_CASE(every_task_once) {
  KeepThreads keep;
  for (const int t : kThreadSettings) {
    pyneuron::set_num_threads(t);
    CHECK_EQ(pyneuron::num_threads(), t);
    for (const int64_t n : kSizes) {
      Scope scope(std::to_string(t) + " thread(s), n " + std::to_string(n));
      for (int repeat = 0; repeat < (n <= 64 ? 50 : 3); ++repeat) {  // the pool is reused between calls
        const std::set<std::thread::id> threads = run_and_check(n);
        CHECK(threads.size() <= std::size_t(t));
        // With one thread (or one task) the body runs in the calling thread.
        if (t == 1 || n == 1) CHECK(threads.empty() || *threads.begin() == std::this_thread::get_id());
      }
    }
  }
}

// A parallel_for inside a body runs in line, still every index once.
TEST_CASE(nested_calls) {
  KeepThreads keep;
  for (const int t : {1, 4}) {
    pyneuron::set_num_threads(t);
    Scope scope(std::to_string(t) + " thread(s)");
    const int64_t outer = 16, inner = 100;
    std::vector<std::atomic<int>> hits(std::size_t(outer * inner));
    for (std::atomic<int>& h : hits) h.store(0);
    pyneuron::parallel_for(outer, [&](int64_t i) {
      pyneuron::parallel_for(inner, [&](int64_t j) { hits[std::size_t(i * inner + j)].fetch_add(1); });
    });
    int wrong = 0;
    for (std::atomic<int>& h : hits) wrong += h.load() != 1;
    CHECK_EQ(wrong, 0);
  }
}

// Two threads calling parallel_for at once: one gets the pool, the other runs in line;
// each runs all its own indices once.
TEST_CASE(concurrent_callers) {
  KeepThreads keep;
  pyneuron::set_num_threads(3);
  for (int repeat = 0; repeat < 20; ++repeat) {
    std::vector<std::thread> callers;
    for (int c = 0; c < 2; ++c) callers.emplace_back([] { run_and_check(20000); });
    for (std::thread& t : callers) t.join();
  }
}

// The first exception of a body is rethrown after the others stop; the pool works after.
TEST_CASE(exception_is_rethrown) {
  KeepThreads keep;
  for (const int t : {1, 3}) {
    pyneuron::set_num_threads(t);
    Scope scope(std::to_string(t) + " thread(s)");
    CHECK_THROWS(pyneuron::parallel_for(1000, [](int64_t i) {
                   if (i == 37) throw std::runtime_error("task 37");
                 }),
                 std::runtime_error);
    run_and_check(1000);
  }
}

TEST_CASE(thread_setting_limits) {
  KeepThreads keep;
  CHECK(pyneuron::max_threads() >= pyneuron::kMinThreadCap);
  CHECK_THROWS(pyneuron::set_num_threads(0), std::invalid_argument);
  CHECK_THROWS(pyneuron::set_num_threads(-1), std::invalid_argument);
  CHECK_THROWS(pyneuron::set_num_threads(pyneuron::max_threads() + 1), std::invalid_argument);
  pyneuron::set_num_threads(pyneuron::max_threads() > 16 ? 16 : pyneuron::max_threads());
  run_and_check(5000);
}

TEST_MAIN()
