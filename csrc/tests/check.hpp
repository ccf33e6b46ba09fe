// A tiny test harness for the native core tests: named cases, CHECK macros that record
// a failure (file, line, values) and go on, and a main() that runs every case (or those
// named on the command line) and exits non-zero if any check failed.
#pragma once
#include <atomic>
#include <cstdio>
#include <cstring>
#include <exception>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

namespace pyneuron_test {

struct Case {
  const char* name;
  std::function<void()> body;
};

inline std::vector<Case>& registry() {
  static std::vector<Case> cases;
  return cases;
}

// Counters are atomic and the context per thread: checks may run in several threads.
inline std::atomic<int>& failures() {
  static std::atomic<int> n{0};
  return n;
}

// Checks evaluated (printed per case, so that a case checking nothing shows).
inline std::atomic<long>& checks() {
  static std::atomic<long> n{0};
  return n;
}

struct Register {
  Register(const char* name, std::function<void()> body) { registry().push_back({name, std::move(body)}); }
};

// Stops printing after this many failures in one case (a broken kernel fails thousands).
constexpr int kMaxReportedPerCase = 20;
inline std::atomic<int>& reported_in_case() {
  static std::atomic<int> n{0};
  return n;
}

inline void fail(const char* file, int line, const std::string& what) {
  ++failures();
  if (++reported_in_case() <= kMaxReportedPerCase) std::fprintf(stderr, "  FAILED %s:%d: %s\n", file, line, what.c_str());
}

template <class T>
std::string show(const T& value) {
  std::ostringstream out;
  out.precision(17);
  out << value;
  return out.str();
}

// Context printed with a failure (e.g. the SIMD level and length being checked).
inline std::string& context() {
  thread_local std::string text;
  return text;
}
struct Scope {
  std::string saved;
  explicit Scope(const std::string& what) : saved(context()) { context() = saved.empty() ? what : saved + ", " + what; }
  ~Scope() { context() = saved; }
};
inline std::string with_context(const std::string& what) {
  return context().empty() ? what : what + "  [" + context() + "]";
}

inline int run_all(int argc, char** argv) {
  int ran = 0, failed_cases = 0;
  for (const Case& c : registry()) {
    bool selected = argc <= 1;
    for (int k = 1; k < argc; ++k) selected = selected || std::strcmp(argv[k], c.name) == 0;
    if (!selected) continue;
    ++ran;
    const int before = failures();
    const long checks_before = checks();
    reported_in_case() = 0;
    context().clear();
    std::printf("[ RUN  ] %s\n", c.name);
    std::fflush(stdout);
    try {
      c.body();
    } catch (const std::exception& e) {
      fail(__FILE__, __LINE__, std::string("uncaught exception: ") + e.what());
    } catch (...) {
      fail(__FILE__, __LINE__, "uncaught exception of unknown type");
    }
    const int n = failures() - before;
    if (n > kMaxReportedPerCase) std::fprintf(stderr, "  ... %d failures in all\n", n);
    std::printf(n == 0 ? "[  OK  ] %s (%ld checks)\n" : "[ FAIL ] %s (%ld checks)\n", c.name,
                checks() - checks_before);
    std::fflush(stdout);
    failed_cases += n != 0;
  }
  if (ran == 0) {
    std::fprintf(stderr, "no test case matched\n");
    return 2;
  }
  std::printf("%d case(s), %d failed\n", ran, failed_cases);
  return failed_cases == 0 ? 0 : 1;
}

}  // namespace pyneuron_test

#define PN_CONCAT2(a, b) a##b
#define PN_CONCAT(a, b) PN_CONCAT2(a, b)

// TEST_CASE(name) { ... }: a named case, run by main() in the order of definition.
#define TEST_CASE(name)                                                                       \
  static void PN_CONCAT(test_body_, name)();                                                  \
  static const ::pyneuron_test::Register PN_CONCAT(test_register_, name)(#name, &PN_CONCAT(test_body_, name)); \
  static void PN_CONCAT(test_body_, name)()

#define TEST_MAIN() \
  int main(int argc, char** argv) { return ::pyneuron_test::run_all(argc, argv); }

#define CHECK(cond)                                                                          \
  do {                                                                                       \
    ++::pyneuron_test::checks();                                                             \
    if (!(cond)) ::pyneuron_test::fail(__FILE__, __LINE__, ::pyneuron_test::with_context("CHECK(" #cond ")")); \
  } while (0)

#define CHECK_EQ(a, b)                                                                              \
  do {                                                                                              \
    const auto& pn_a_ = (a);                                                                        \
    const auto& pn_b_ = (b);                                                                        \
    ++::pyneuron_test::checks();                                                                    \
    if (!(pn_a_ == pn_b_))                                                                          \
      ::pyneuron_test::fail(__FILE__, __LINE__,                                                     \
                            ::pyneuron_test::with_context("CHECK_EQ(" #a ", " #b "): " +            \
                                                          ::pyneuron_test::show(pn_a_) + " != " +   \
                                                          ::pyneuron_test::show(pn_b_)));           \
  } while (0)

// The statement must throw an exception of the given type (or one derived from it).
#define CHECK_THROWS(stmt, type)                                                                        \
  do {                                                                                                  \
    bool pn_thrown_ = false;                                                                            \
    ++::pyneuron_test::checks();                                                                        \
    try {                                                                                               \
      stmt;                                                                                             \
    } catch (const type&) {                                                                             \
      pn_thrown_ = true;                                                                                \
    } catch (...) {                                                                                     \
    }                                                                                                   \
    if (!pn_thrown_)                                                                                    \
      ::pyneuron_test::fail(__FILE__, __LINE__, ::pyneuron_test::with_context("CHECK_THROWS(" #stmt ", " #type ")")); \
  } while (0)
