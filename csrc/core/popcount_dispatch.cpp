#include <atomic>
#include <chrono>
#include <cstdlib>
#include <random>
#include <stdexcept>

#include "popcount.hpp"

namespace pyneuron {

namespace {

struct Level {
  const char* name;
  AndPopcountFn fn;
  AndPopcountManyFn many;
  TileCountFn tile;
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
  std::vector<Level> levels{
      {"scalar", &kernels::and_popcount_scalar, &kernels::and_popcount_many_scalar, &kernels::tile_counts_scalar}};
#ifdef PYNEURON_X86
  if (cpu_has("avx2"))
    levels.push_back(
        {"avx2", &kernels::and_popcount_avx2, &kernels::and_popcount_many_avx2, &kernels::tile_counts_avx2});
  if (cpu_has("avx512"))
    levels.push_back({"avx512", &kernels::and_popcount_avx512, &kernels::and_popcount_many_avx512,
                      &kernels::tile_counts_avx512});
#endif
  return levels;
}

struct State {
  std::atomic<AndPopcountFn> fn{nullptr};
  std::atomic<AndPopcountManyFn> many{nullptr};
  std::atomic<TileCountFn> tile{nullptr};
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
    s.many.store(chosen.many);
    s.tile.store(chosen.tile);
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
  s.many.store(chosen.many);
  s.tile.store(chosen.tile);
  s.name = chosen.name;
}

AndPopcountFn and_popcount_kernel() { return state().fn.load(std::memory_order_relaxed); }

AndPopcountManyFn and_popcount_many_kernel() { return state().many.load(std::memory_order_relaxed); }

TileCountFn tile_count_kernel() { return state().tile.load(std::memory_order_relaxed); }

double and_popcount_throughput(std::size_t words, double seconds) {
  if (words == 0) throw std::invalid_argument("words must be at least 1");
  constexpr std::size_t kRows = 64;
  std::mt19937_64 random(42);
  std::vector<uint64_t> data((kRows + 1) * words);
  for (uint64_t& x : data) x = random();
  std::vector<const uint64_t*> rows;
  for (std::size_t j = 1; j <= kRows; ++j) rows.push_back(data.data() + j * words);
  std::vector<uint64_t> out(kRows);
  const AndPopcountManyFn many = and_popcount_many_kernel();
  using Clock = std::chrono::steady_clock;
  uint64_t sink = 0, passes = 0;
  many(data.data(), rows.data(), kRows, words, out.data());  // warm the caches
  const Clock::time_point start = Clock::now();
  double elapsed = 0;
  do {
    for (int k = 0; k < 16; ++k, ++passes) {
      many(data.data() + (passes % 2) * words, rows.data(), kRows, words, out.data());
      sink += out[passes % kRows];
    }
    elapsed = std::chrono::duration<double>(Clock::now() - start).count();
  } while (elapsed < seconds);
  static volatile uint64_t observed;  // keeps the kernel calls from being optimized away
  observed = sink;
  return 16.0 * double(words) * double(kRows) * double(passes) / elapsed;
}

}  // namespace pyneuron
