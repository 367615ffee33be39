// AVX2+FMA instantiation of the CPU Adam kernel (compiled with -mavx2 -mfma; chosen at run time).
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
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
  // bf16 (see ScalarVec in adam_kernel.inl for the rounding rule): widen 8 x u16 to u32, << 16.
  static reg load_bf16(const uint16_t* x) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static reg round_bf16(reg a) {
    __m256i u = _mm256_castps_si256(a);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i rne = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
    __m256i quiet = _mm256_or_si256(u, _mm256_set1_epi32(0x00400000));
    reg r = _mm256_blendv_ps(_mm256_castsi256_ps(rne), _mm256_castsi256_ps(quiet),
                             _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
    return _mm256_and_ps(r, _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(0xffff0000u))));
  }
  // Upper halves packed to 8 x u16 (16 bytes; exact, each is below 2^16); non-temporal when
  // aligned, as store_out.
  static void store_bf16(uint16_t* x, reg a) {
    __m256i h = _mm256_srli_epi32(_mm256_castps_si256(a), 16);
    __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
    auto* d = reinterpret_cast<__m128i*>(x);
    if ((reinterpret_cast<uintptr_t>(x) & 15) == 0) _mm_stream_si128(d, packed);
    else _mm_storeu_si128(d, packed);
  }
};
#include "cpu/adam_kernel.inl"
}  // namespace

namespace pyasgd::cpu {
const IsaKernels& isa_avx2() { static const auto k = make_isa_kernels<Avx2>("avx2"); return k; }
}  // namespace pyasgd::cpu
