// AVX-512 instantiation of the CPU Adam kernel (compiled with -mavx512f; chosen at run time).
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include "cpu/kernels.h"

namespace {
struct Avx512 {
  using reg = __m512;
  static constexpr int width = 16;
  static reg load(const float* x) { return _mm512_loadu_ps(x); }
  static void store(float* x, reg a) { _mm512_storeu_ps(x, a); }
  // Non-temporal when aligned: out and the sum buffer are not read again by this pass, and
  // skipping the read-for-ownership saves 4 bytes of traffic per element.
  static void store_out(float* x, reg a) {
    if ((reinterpret_cast<uintptr_t>(x) & 63) == 0) _mm512_stream_ps(x, a);
    else _mm512_storeu_ps(x, a);
  }
  static reg set1(float a) { return _mm512_set1_ps(a); }
  static reg zero() { return _mm512_setzero_ps(); }
  static reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static reg sub(reg a, reg b) { return _mm512_sub_ps(a, b); }
  static reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static reg div(reg a, reg b) { return _mm512_div_ps(a, b); }
  static reg sqrt(reg a) { return _mm512_sqrt_ps(a); }
  static reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static void fence() { _mm_sfence(); }
  static reg max(reg a, reg b) { return _mm512_max_ps(a, b); }
  static reg abs(reg a) { return _mm512_abs_ps(a); }
  static float hmax(reg a) { return _mm512_reduce_max_ps(a); }
  static bool any_nan(reg a) { return _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q) != 0; }
};
#include "cpu/adam_kernel.inl"
}  // namespace

namespace pyasgd::cpu {
const IsaKernels& isa_avx512() { static const auto k = make_isa_kernels<Avx512>("avx512"); return k; }
}  // namespace pyasgd::cpu
