// The per-ISA table of CPU kernels: each ISA's translation unit exports one, and the CPU entry
// points (adam_cpu.cpp, copy.cpp) use the one isa() picks for this CPU.
#pragma once
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "adam.h"

namespace pyasgd::cpu {

// The kernels that read the G gradients, for one gradient type T: float, or uint16_t holding
// bf16 bits (widened exactly, bits << 16, and summed in fp32 in index order like floats).
// Each kernel works on the element range [b, e) so the callers can split work into tiles.
template <class T>
struct GradKernels {
  // True when every element of sum(g[0..G)) in the range is finite.
  bool (*finite)(const T* const* g, int G, size_t b, size_t e);
  // Stores sum(g[0..G)) to dst (fp32) and returns whether all of it is finite.
  bool (*sum)(const T* const* g, int G, float* dst, size_t b, size_t e);
  // The Adam update from sum(g[0..G)): reads p, writes the new parameters to p_out (p itself for
  // in place; never p otherwise) and to out when it is not null.
  void (*apply)(const float* p, float* p_out, float* m, float* v, const T* const* g, int G,
                float* out, size_t b, size_t e, const AdamScalars& c);
};

struct IsaKernels {
  const char* name;  // reported by cpu_simd_level()
  GradKernels<float> f32;
  GradKernels<uint16_t> bf16;
  // Copies src to dst and returns max |x| (+inf when an element is not finite).
  float (*copy_absmax)(float* dst, const float* src, size_t b, size_t e);
  // Rounds src to bf16 (nearest even) into dst and returns max |rounded| (+inf: not finite).
  float (*copy_bf16_absmax)(uint16_t* dst, const float* src, size_t b, size_t e);

  template <class T>
  const GradKernels<T>& grads() const {
    if constexpr (std::is_same_v<T, float>) return f32;
    else return bf16;
  }
};

const IsaKernels& isa_scalar();
#if defined(__x86_64__) || defined(_M_X64)
const IsaKernels& isa_avx2();    // built only on x86-64 (CMakeLists.txt)
const IsaKernels& isa_avx512();
#endif

// The table for this CPU, chosen once (PYASGD_SIMD=avx2|scalar caps it).
const IsaKernels& isa();

// 256K floats (1 MiB) per stream per tile: long contiguous streams per thread, still ~100 tiles
// at 25M parameters to balance two threads that share cores with other work.
constexpr size_t kTile = size_t{1} << 18;
// Elements ahead that the Adam loop prefetches in each stream (4 KB of floats).
constexpr size_t kPrefetch = 1024;
// Below this, waking the thread pool costs more than it saves.
constexpr size_t kParallelMin = size_t{1} << 17;

}  // namespace pyasgd::cpu
