// CPU entry point of the fused update: picks the SIMD level once, then runs the check pass and
// the Adam pass over tiles split across the thread pool.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <utility>

#include "adam.h"
#include "cpu/kernels.h"
#include "cpu/thread_pool.h"

namespace pyasgd {
namespace cpu {
namespace {

const IsaKernels& detect() {
  // PYASGD_SIMD caps the level (tests use it to exercise every instantiation on one machine).
  const char* env = std::getenv("PYASGD_SIMD");
  const std::string cap = env ? env : "";
  if (cap == "scalar") return isa_scalar();
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  const bool has512 = __builtin_cpu_supports("avx512f");
  const bool has2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (has512 && cap != "avx2") return isa_avx512();
  if (has2) return isa_avx2();
#endif
  return isa_scalar();
}

}  // namespace

const IsaKernels& isa() {
  static const IsaKernels& chosen = detect();
  return chosen;
}

}  // namespace cpu

const char* cpu_simd_level() { return cpu::isa().name; }
int cpu_num_threads() { return cpu::pool().size(); }
void cpu_set_num_threads(int n) { cpu::set_threads(n); }

namespace {

template <class T>
bool adam_step_cpu_t(const float* param, float* param_out, float* m, float* v,
                     const T* const* grads, int G, size_t n, float* out, float* workspace,
                     const AdamHyper& h, bool assume_finite) {
  const cpu::IsaKernels& k = cpu::isa();
  const cpu::GradKernels<T>& gk = k.grads<T>();
  const AdamScalars c = make_scalars(h);
  const size_t tiles = n < cpu::kParallelMin ? 1 : (n + cpu::kTile - 1) / cpu::kTile;
  const size_t tile = n < cpu::kParallelMin ? n : cpu::kTile;
  auto bounds = [&](size_t t) { return std::make_pair(t * tile, std::min(n, (t + 1) * tile)); };
  if (assume_finite) {  // the common case on the server: one pass
    cpu::pool().run(tiles, [&](size_t t) {
      auto [b, e] = bounds(t);
      gk.apply(param, param_out, m, v, grads, G, out, b, e, c);
    });
    return true;
  }
  // Nothing may be written unless every summed element is finite, which is only known after
  // reading all gradients. For G <= 2 a read-only check pass is the cheapest way to know; for
  // larger G, summing into the workspace in the same pass lets the Adam pass read 1 buffer, not G
  // (an fp32 one, whatever the gradients' type).
  const bool presum = workspace != nullptr && G >= 3;
  std::atomic<bool> finite{true};
  cpu::pool().run(tiles, [&](size_t t) {
    if (!finite.load(std::memory_order_relaxed)) return;  // already failed: stop reading
    auto [b, e] = bounds(t);
    bool ok = presum ? gk.sum(grads, G, workspace, b, e) : gk.finite(grads, G, b, e);
    if (!ok) finite.store(false, std::memory_order_relaxed);
  });
  if (!finite.load()) return false;

  const float* summed = workspace;
  cpu::pool().run(tiles, [&](size_t t) {
    auto [b, e] = bounds(t);
    if (presum) k.f32.apply(param, param_out, m, v, &summed, 1, out, b, e, c);
    else gk.apply(param, param_out, m, v, grads, G, out, b, e, c);
  });
  return true;
}

}  // namespace

bool adam_step_cpu(const float* param, float* param_out, float* m, float* v,
                   const float* const* grads, int G, size_t n, float* out, float* workspace,
                   const AdamHyper& h, bool assume_finite) {
  return adam_step_cpu_t(param, param_out, m, v, grads, G, n, out, workspace, h, assume_finite);
}

bool adam_step_cpu(const float* param, float* param_out, float* m, float* v,
                   const uint16_t* const* grads, int G, size_t n, float* out, float* workspace,
                   const AdamHyper& h, bool assume_finite) {
  return adam_step_cpu_t(param, param_out, m, v, grads, G, n, out, workspace, h, assume_finite);
}

}  // namespace pyasgd
