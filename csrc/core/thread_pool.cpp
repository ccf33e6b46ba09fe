#include "thread_pool.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if defined(_WIN32)
#include <process.h>
#define PYNEURON_GETPID _getpid
#else
#include <unistd.h>
#define PYNEURON_GETPID getpid
#endif
#if defined(__linux__)
#include <sys/resource.h>

#include <climits>
#include <cstdio>
#endif

namespace pyneuron {

namespace {
int default_threads() {
  if (const char* env = std::getenv("PYNEURON_NUM_THREADS"); env != nullptr && *env != '\0') {
    // Digits only (atoi of "99999999999" would overflow); larger than the cap: the cap.
    const std::size_t digits = std::strspn(env, "0123456789");
    if (digits > 0 && env[digits] == '\0') {
      if (digits > 9) return max_threads();
      const int n = std::atoi(env);
      if (n > 0) return std::min(n, max_threads());
    }
  }
  return std::min(max_threads(), int(std::max(1u, std::thread::hardware_concurrency())));
}
std::atomic<int>& thread_setting() {
  static std::atomic<int> n{default_threads()};
  return n;
}

// Set while this thread runs a parallel_for body: a nested parallel_for runs in line.
// Initial-exec TLS lives in the static TLS block set up with each thread: the default
// (dynamic) model allocates it on a thread's first access, and glibc aborts the process
// ("cannot allocate memory for thread-local data") when that allocation fails.
#if defined(__GNUC__) && !defined(_WIN32)
__attribute__((tls_model("initial-exec")))
#endif
thread_local bool in_parallel_body = false;

void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Waits for `ready()`: spinning for a few tens of microseconds (a search runs dozens of
// parallel_for calls back to back), then blocking on `cv` under `mutex`.
template <class Ready>
void wait_for(Ready ready, std::mutex& mutex, std::condition_variable& cv) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(50);
  for (int spin = 1; !ready(); ++spin) {
    cpu_relax();
    if (spin % 64 == 0 && std::chrono::steady_clock::now() > until) {
      std::unique_lock<std::mutex> lock(mutex);
      cv.wait(lock, ready);
      return;
    }
  }
}

// How many threads fit in the address space left under RLIMIT_AS, keeping half of it
// for the work. Starting a thread close to that limit can abort the process inside the
// C library ("cannot allocate memory for thread-local data") before any error can be
// returned, so the pool never goes near it. Each thread is counted with its stack and a
// malloc arena (64 MiB of address space on 64-bit glibc). No limit: no cap.
int threads_that_fit() {
#if defined(__linux__)
  rlimit space{};
  if (getrlimit(RLIMIT_AS, &space) != 0 || space.rlim_cur == RLIM_INFINITY) return INT_MAX;
  long pages = 0;
  if (std::FILE* statm = std::fopen("/proc/self/statm", "r")) {
    if (std::fscanf(statm, "%ld", &pages) != 1) pages = 0;
    std::fclose(statm);
  }
  const uint64_t used = uint64_t(std::max(0L, pages)) * uint64_t(sysconf(_SC_PAGESIZE));
  if (used >= space.rlim_cur) return 1;
  uint64_t stack = uint64_t(8) << 20;
  rlimit stack_limit{};
  if (getrlimit(RLIMIT_STACK, &stack_limit) == 0 && stack_limit.rlim_cur != RLIM_INFINITY &&
      stack_limit.rlim_cur > 0)
    stack = stack_limit.rlim_cur;
  const uint64_t per_thread = stack + (uint64_t(64) << 20);
  const uint64_t fit = (space.rlim_cur - used) / 2 / per_thread;
  return int(std::max<uint64_t>(1, std::min<uint64_t>(fit, INT_MAX)));
#else
  return INT_MAX;
#endif
}

// Worker threads kept between calls. Each parallel_for is one job: every worker joins it
// once and claims items from a shared counter, the calling thread too.
class Pool {
 public:
  explicit Pool(int threads) : pid_(PYNEURON_GETPID()), requested_(threads) {
    threads = std::min(threads, threads_that_fit());
    if (!start(std::size_t(std::max(0, threads - 1)))) {
      // The system refused a thread (std::system_error: no memory for a stack, a process
      // limit), so memory or a limit is nearly exhausted: keep half of those started,
      // leaving room for the work itself, or the calling thread alone. (A worker whose
      // allocation fails throws, and throwing needs memory of its own.)
      const std::size_t keep = threads_.size() / 2;
      stop_all();
      start(keep);
    }
  }
  ~Pool() { stop_all(); }
  int size() const { return int(threads_.size()) + 1; }
  // The thread setting this pool was built for (it may run fewer, see the constructor).
  int requested() const { return requested_; }
  bool forked() const { return pid_ != long(PYNEURON_GETPID()); }
  // Runs a job, or returns false at once when another thread's job holds the pool.
  bool try_run(int64_t n, const std::function<void(int64_t)>& body) {
    std::unique_lock<std::mutex> running(run_mutex_, std::try_to_lock);
    if (!running.owns_lock()) return false;
    body_ = &body;
    n_ = n;
    next_.store(0);
    finished_.store(0);
    error_ = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    work();
    const int workers = int(threads_.size());
    wait_for([&] { return finished_.load(std::memory_order_acquire) == workers; }, mutex_, done_);
    body_ = nullptr;
    if (error_) std::rethrow_exception(error_);
    return true;
  }

 private:
  // Starts workers until there are n; false if the system refused one.
  bool start(std::size_t n) {
    const uint64_t now = generation_.load();
    try {
      while (threads_.size() < n) threads_.emplace_back([this, now] { loop(now); });
    } catch (const std::exception&) {
      return false;
    }
    return true;
  }
  // Stops and joins every worker (between jobs only).
  void stop_all() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
      generation_.fetch_add(1);
    }
    wake_.notify_all();
    for (std::thread& t : threads_) t.join();
    threads_.clear();
    stop_ = false;
  }
  void work() {
    in_parallel_body = true;
    for (int64_t i = next_.fetch_add(1); i < n_; i = next_.fetch_add(1)) {
      try {
        (*body_)(i);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex_);
        if (!error_) error_ = std::current_exception();
        next_.store(n_);
      }
    }
    in_parallel_body = false;
  }
  void loop(uint64_t seen) {
    // The C++ runtime's per-thread exception state is allocated on first use; use it now,
    // while memory is available, not when an allocation failure is being thrown.
    (void)std::uncaught_exceptions();
    for (;;) {
      wait_for([&] { return generation_.load(std::memory_order_acquire) != seen; }, mutex_, wake_);
      seen = generation_.load(std::memory_order_acquire);
      if (stop_) return;
      work();
      if (finished_.fetch_add(1, std::memory_order_acq_rel) + 1 == int(threads_.size())) {
        std::lock_guard<std::mutex> lock(mutex_);
        done_.notify_one();
      }
    }
  }

  const long pid_;  // the process that started the threads (a fork child has none)
  const int requested_;
  std::vector<std::thread> threads_;
  std::mutex run_mutex_;  // one job at a time
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  std::atomic<uint64_t> generation_{0};  // bumped per job (and to stop)
  bool stop_ = false;
  const std::function<void(int64_t)>* body_ = nullptr;
  int64_t n_ = 0;
  std::atomic<int64_t> next_{0};
  std::atomic<int> finished_{0};  // workers done with the current job
  std::mutex error_mutex_;
  std::exception_ptr error_;
};

// The process's pool, rebuilt when the thread setting changes or after a fork (whose
// child inherits the pool but not its threads: that one is left alone, never joined).
// A pool being replaced finishes the job it runs: its callers hold it. The current one
// is never destroyed (its workers stay parked until the process exits).
std::shared_ptr<Pool> pool_for(int threads) {
  static std::mutex* mutex = new std::mutex;
  static std::shared_ptr<Pool>* pool = new std::shared_ptr<Pool>;
  std::lock_guard<std::mutex> lock(*mutex);
  if (*pool != nullptr && (*pool)->forked()) pool = new std::shared_ptr<Pool>;  // the old one leaks
  if (*pool == nullptr || (*pool)->requested() != threads) *pool = std::make_shared<Pool>(threads);
  return *pool;
}
}  // namespace

int max_threads() {
  const unsigned cpus = std::thread::hardware_concurrency();
  return int(std::max<unsigned>(kMinThreadCap, std::min<unsigned>(cpus, 1u << 20) * 4u));
}

int num_threads() { return thread_setting().load(); }

void set_num_threads(int n) {
  if (n < 1) throw std::invalid_argument("number of threads must be at least 1");
  if (n > max_threads())
    throw std::invalid_argument("number of threads must be at most " + std::to_string(max_threads()) +
                                " (4 per CPU, at least " + std::to_string(kMinThreadCap) + "), got " +
                                std::to_string(n));
  thread_setting().store(n);
}

void parallel_for(int64_t n, const std::function<void(int64_t)>& body) {
  const int threads = num_threads();
  if (n <= 1 || threads <= 1 || in_parallel_body || !pool_for(threads)->try_run(n, body))
    for (int64_t i = 0; i < n; ++i) body(i);
}

}  // namespace pyneuron
