// Per-ISA entry points of the CPU Adam kernel; adam_cpu.cpp picks one at run time.
#pragma once
#include <cstddef>
#include "adam.h"

namespace pyasgd::cpu {
#define PYASGD_DECLARE_ISA(isa)                                                               \
  bool range_finite_##isa(const float* const* g, int G, size_t b, size_t e);                 \
  bool range_sum_##isa(const float* const* g, int G, float* dst, size_t b, size_t e);       \
  float range_copy_absmax_##isa(float* dst, const float* src, size_t b, size_t e);          \
  void adam_range_##isa(float* p, float* m, float* v, const float* const* g, int G, float* out, \
                        size_t b, size_t e, const AdamScalars& c);
PYASGD_DECLARE_ISA(avx512)
PYASGD_DECLARE_ISA(avx2)
PYASGD_DECLARE_ISA(scalar)
#undef PYASGD_DECLARE_ISA
}  // namespace pyasgd::cpu
