// The per-ISA table of CPU kernels: each ISA's translation unit exports one, and the CPU entry
// points (adam_cpu.cpp, copy.cpp) use the one isa() picks for this CPU.
#pragma once
#include <cstddef>

#include "adam.h"

namespace pyasgd::cpu {

// Each kernel works on the element range [b, e) so the callers can split work into tiles.
struct IsaKernels {
  const char* name;  // reported by cpu_simd_level()
  // True when every element of sum(g[0..G)) in the range is finite.
  bool (*finite)(const float* const* g, int G, size_t b, size_t e);
  // Stores sum(g[0..G)) to dst and returns whether all of it is finite.
  bool (*sum)(const float* const* g, int G, float* dst, size_t b, size_t e);
  // The Adam update from sum(g[0..G)); out may be null.
  void (*apply)(float* p, float* m, float* v, const float* const* g, int G, float* out, size_t b,
                size_t e, const AdamScalars& c);
  // Copies src to dst and returns max |x| (+inf when an element is not finite).
  float (*copy_absmax)(float* dst, const float* src, size_t b, size_t e);
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
// Below this, waking the thread pool costs more than it saves.
constexpr size_t kParallelMin = size_t{1} << 17;

}  // namespace pyasgd::cpu
