// AVX-512 instantiation of the CPU Adam kernel (compiled with -mavx512f; chosen at run time).
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
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
  // bf16 (see ScalarVec in adam_kernel.inl for the rounding rule): widen 16 x u16 to u32, << 16.
  static reg load_bf16(const uint16_t* x) {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static reg round_bf16(reg a) {
    __m512i u = _mm512_castps_si512(a);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i rne = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    __m512i quiet = _mm512_or_si512(u, _mm512_set1_epi32(0x00400000));
    __m512i r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q), rne, quiet);
    return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
  }
  // Upper halves narrowed to 16 x u16 (32 bytes); non-temporal when aligned, as store_out.
  static void store_bf16(uint16_t* x, reg a) {
    __m256i h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(a), 16));
    auto* d = reinterpret_cast<__m256i*>(x);
    if ((reinterpret_cast<uintptr_t>(x) & 31) == 0) _mm256_stream_si256(d, h);
    else _mm256_storeu_si256(d, h);
  }
};
#include "cpu/adam_kernel.inl"
}  // namespace

namespace pyasgd::cpu {
const IsaKernels& isa_avx512() { static const auto k = make_isa_kernels<Avx512>("avx512"); return k; }
}  // namespace pyasgd::cpu
