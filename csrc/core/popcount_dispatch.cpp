#include <atomic>
#include <cstdlib>
#include <stdexcept>

#include "popcount.hpp"

namespace pyneuron {

namespace {

struct Level {
  const char* name;
  AndPopcountFn fn;
};

bool cpu_has(const char* level) {
#ifdef PYNEURON_X86
  __builtin_cpu_init();
  const std::string name(level);
  if (name == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
  if (name == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vpopcntdq");
#endif
  return std::string(level) == "scalar";
}

std::vector<Level> supported_levels() {
  std::vector<Level> levels{{"scalar", &kernels::and_popcount_scalar}};
#ifdef PYNEURON_X86
  if (cpu_has("avx2")) levels.push_back({"avx2", &kernels::and_popcount_avx2});
  if (cpu_has("avx512")) levels.push_back({"avx512", &kernels::and_popcount_avx512});
#endif
  return levels;
}

struct State {
  std::atomic<AndPopcountFn> fn{nullptr};
  std::string name;
};

Level find_level(const std::string& name) {
  for (const Level& level : supported_levels())
    if (name == level.name) return level;
  std::string known;
  for (const Level& level : supported_levels()) known += std::string(known.empty() ? "" : ", ") + level.name;
  throw std::invalid_argument("SIMD level '" + name + "' is not available on this CPU or build; available: " + known);
}

State& state() {
  static State s;
  // Retried on the next call if PYNEURON_SIMD names an unavailable level.
  static const bool initialized = [] {
    Level chosen = supported_levels().back();
    if (const char* env = std::getenv("PYNEURON_SIMD"); env != nullptr && *env != '\0')
      chosen = find_level(env);
    s.fn.store(chosen.fn);
    s.name = chosen.name;
    return true;
  }();
  (void)initialized;
  return s;
}

}  // namespace

std::vector<std::string> available_simd_levels() {
  std::vector<std::string> names;
  for (const Level& level : supported_levels()) names.emplace_back(level.name);
  return names;
}

std::string simd_level() { return state().name; }

void set_simd_level(const std::string& level) {
  const Level chosen = find_level(level);
  State& s = state();
  s.fn.store(chosen.fn);
  s.name = chosen.name;
}

AndPopcountFn and_popcount_kernel() { return state().fn.load(std::memory_order_relaxed); }

}  // namespace pyneuron
