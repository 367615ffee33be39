// AVX2+FMA instantiation of the CPU Adam kernel (compiled with -mavx2 -mfma; chosen at run time).
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include "cpu/kernels.h"

namespace {
struct Avx2 {
  using reg = __m256;
  static constexpr int width = 8;
  static reg load(const float* x) { return _mm256_loadu_ps(x); }
  static void store(float* x, reg a) { _mm256_storeu_ps(x, a); }
  static void store_out(float* x, reg a) {
    if ((reinterpret_cast<uintptr_t>(x) & 31) == 0) _mm256_stream_ps(x, a);
    else _mm256_storeu_ps(x, a);
  }
  static reg set1(float a) { return _mm256_set1_ps(a); }
  static reg zero() { return _mm256_setzero_ps(); }
  static reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static reg sub(reg a, reg b) { return _mm256_sub_ps(a, b); }
  static reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static reg div(reg a, reg b) { return _mm256_div_ps(a, b); }
  static reg sqrt(reg a) { return _mm256_sqrt_ps(a); }
  static reg fmadd(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static void fence() { _mm_sfence(); }
  static reg max(reg a, reg b) { return _mm256_max_ps(a, b); }
  static reg abs(reg a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
  static float hmax(reg a) {
    alignas(32) float t[8];
    _mm256_store_ps(t, a);
    return *std::max_element(t, t + 8);
  }
  static bool any_nan(reg a) { return _mm256_movemask_ps(_mm256_cmp_ps(a, a, _CMP_UNORD_Q)) != 0; }
};
#include "cpu/adam_kernel.inl"
}  // namespace

namespace pyasgd::cpu {
const IsaKernels& isa_avx2() { static const auto k = make_isa_kernels<Avx2>("avx2"); return k; }
}  // namespace pyasgd::cpu
