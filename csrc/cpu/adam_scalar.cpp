// Portable scalar instantiation of the CPU Adam kernel: the fallback on CPUs without AVX2.
#include <algorithm>
#include <cmath>
#include "adam.h"
#include "cpu/kernels.h"

namespace {
#include "cpu/adam_kernel.inl"
}  // namespace

namespace pyasgd::cpu {
bool range_finite_scalar(const float* const* g, int G, size_t b, size_t e) {
  return range_finite_t<ScalarVec>(g, G, b, e);
}
bool range_sum_scalar(const float* const* g, int G, float* dst, size_t b, size_t e) {
  return range_sum_t<ScalarVec>(g, G, dst, b, e);
}
float range_copy_absmax_scalar(float* dst, const float* src, size_t b, size_t e) {
  return range_copy_absmax_t<ScalarVec>(dst, src, b, e);
}
void adam_range_scalar(float* p, float* m, float* v, const float* const* g, int G, float* out,
                       size_t b, size_t e, const AdamScalars& c) {
  adam_range_t<ScalarVec, ScalarVec>(p, m, v, g, G, out, b, e, c);
}
}  // namespace pyasgd::cpu
