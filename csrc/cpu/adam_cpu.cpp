// CPU entry point of the fused update: picks the SIMD level once, then runs the check pass and
// the Adam pass over tiles split across the thread pool.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <string>
#include <vector>

#include "adam.h"
#include "cpu/kernels.h"
#include "cpu/thread_pool.h"

namespace pyasgd {
namespace {

using FiniteFn = bool (*)(const float* const*, int, size_t, size_t);
using SumFn = bool (*)(const float* const*, int, float*, size_t, size_t);
using CopyFn = float (*)(float*, const float*, size_t, size_t);
using ApplyFn = void (*)(float*, float*, float*, const float* const*, int, float*, size_t, size_t,
                         const AdamScalars&);

struct Isa {
  const char* name;
  FiniteFn finite;
  SumFn sum;
  ApplyFn apply;
  CopyFn copy_absmax;
};

#define PYASGD_ISA(x) \
  Isa{#x, cpu::range_finite_##x, cpu::range_sum_##x, cpu::adam_range_##x, cpu::range_copy_absmax_##x}

Isa detect() {
  __builtin_cpu_init();
  const bool has512 = __builtin_cpu_supports("avx512f");
  const bool has2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  // PYASGD_SIMD caps the level (tests use it to exercise every instantiation on one machine).
  std::string cap = std::getenv("PYASGD_SIMD") ? std::getenv("PYASGD_SIMD") : "";
  if (cap == "scalar") return PYASGD_ISA(scalar);
  if (has512 && cap != "avx2") return PYASGD_ISA(avx512);
  if (has2) return PYASGD_ISA(avx2);
  return PYASGD_ISA(scalar);
}

const Isa& isa() {
  static const Isa chosen = detect();
  return chosen;
}

// 256K floats (1 MiB) per stream per tile: long contiguous streams per thread, still ~100 tiles
// at 25M parameters to balance two threads that share cores with other work.
constexpr size_t kTile = 1 << 18;
// Below this, waking the pool costs more than it saves.
constexpr size_t kParallelMin = 1 << 17;

}  // namespace

const char* cpu_simd_level() { return isa().name; }

float copy_absmax_cpu(float* dst, const float* src, size_t n) {
  const Isa& k = isa();
  if (n < kParallelMin) return k.copy_absmax(dst, src, 0, n);
  const size_t tiles = (n + kTile - 1) / kTile;
  std::vector<float> part(tiles);
  cpu::pool().run(tiles, [&](size_t t) {
    part[t] = k.copy_absmax(dst, src, t * kTile, std::min(n, (t + 1) * kTile));
  });
  return *std::max_element(part.begin(), part.end());
}
int cpu_num_threads() { return cpu::pool().size(); }
void cpu_set_num_threads(int n) { cpu::set_threads(n); }

bool adam_step_cpu(float* param, float* m, float* v, const float* const* grads, int G, size_t n,
                   float* out, float* workspace, const AdamHyper& h, bool assume_finite) {
  const Isa& k = isa();
  const AdamScalars c = make_scalars(h);
  const size_t tiles = n < kParallelMin ? 1 : (n + kTile - 1) / kTile;
  const size_t tile = n < kParallelMin ? n : kTile;
  auto bounds = [&](size_t t) { return std::make_pair(t * tile, std::min(n, (t + 1) * tile)); };
  if (assume_finite) {  // the common case on the server: one pass
    cpu::pool().run(tiles, [&](size_t t) {
      auto [b, e] = bounds(t);
      k.apply(param, m, v, grads, G, out, b, e, c);
    });
    return true;
  }
  // Nothing may be written unless every summed element is finite, which is only known after
  // reading all gradients. For G <= 2 a read-only check pass is the cheapest way to know; for
  // larger G, summing into the workspace in the same pass lets the Adam pass read 1 buffer, not G.
  const bool presum = workspace != nullptr && G >= 3;
  const float* summed = workspace;
  const float* const* apply_grads = presum ? &summed : grads;
  const int apply_G = presum ? 1 : G;

  std::atomic<bool> finite{true};
  cpu::pool().run(tiles, [&](size_t t) {
    if (!finite.load(std::memory_order_relaxed)) return;  // already failed: stop reading
    auto [b, e] = bounds(t);
    bool ok = presum ? k.sum(grads, G, workspace, b, e) : k.finite(grads, G, b, e);
    if (!ok) finite.store(false, std::memory_order_relaxed);
  });
  if (!finite.load()) return false;

  cpu::pool().run(tiles, [&](size_t t) {
    auto [b, e] = bounds(t);
    k.apply(param, m, v, apply_grads, apply_G, out, b, e, c);
  });
  return true;
}

}  // namespace pyasgd
