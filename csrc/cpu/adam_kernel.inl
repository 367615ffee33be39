// The CPU kernel body, written once over a vector type V and included by each SIMD translation
// unit (adam_avx512.cpp, adam_avx2.cpp, adam_scalar.cpp) inside an anonymous namespace, so every
// instantiation keeps internal linkage and the linker can never mix code built for another ISA.
// The scalar tail uses the same operation sequence (explicit fma) as the vector body, and the
// build turns off FP contraction, so an element's result does not depend on its position.
//
// Requires: #include <algorithm>, <cmath>, <cstdint>, <cstring> and "cpu/kernels.h" before the
// namespace, and a vector struct V with width/load/store/store_out/set1/zero/add/sub/mul/div/sqrt/
// fmadd/max/abs/hmax/any_nan/fence and the bf16 trio load_bf16/round_bf16/store_bf16 (ScalarVec
// below is the model). Export the ISA with make_isa_kernels<V>(name): the one place that lists
// the kernels.

// The scalar tail of every ISA and, on its own, the portable instantiation.
struct ScalarVec {
  using reg = float;
  static constexpr int width = 1;
  static float load(const float* x) { return *x; }
  static void store(float* x, float a) { *x = a; }
  static void store_out(float* x, float a) { *x = a; }
  static float set1(float a) { return a; }
  static float zero() { return 0.0f; }
  static float add(float a, float b) { return a + b; }
  static float sub(float a, float b) { return a - b; }
  static float mul(float a, float b) { return a * b; }
  static float div(float a, float b) { return a / b; }
  static float sqrt(float a) { return std::sqrt(a); }
  static float fmadd(float a, float b, float c) { return std::fma(a, b, c); }
  static bool any_nan(float a) { return a != a; }
  static void fence() {}
  static float max(float a, float b) { return std::max(a, b); }
  static float abs(float a) { return std::fabs(a); }
  static float hmax(float a) { return a; }

  static uint32_t bits(float a) {
    uint32_t u;
    std::memcpy(&u, &a, sizeof u);
    return u;
  }
  static float from_bits(uint32_t u) {
    float a;
    std::memcpy(&a, &u, sizeof a);
    return a;
  }
  // bf16 -> fp32 is exact: the bf16 bits are the float's upper half.
  static float load_bf16(const uint16_t* x) { return from_bits(uint32_t{*x} << 16); }
  // fp32 -> the nearest bf16 (ties to even), returned as the fp32 of the same value (low half
  // zero). A NaN keeps its sign and gets the quiet bit, so dropping its low half cannot make it
  // inf; a finite value above bf16's largest rounds to inf, as the carry reaches the exponent.
  static float round_bf16(float a) {
    uint32_t u = bits(a);
    u = a != a ? (u | 0x00400000u) : u + 0x7fffu + ((u >> 16) & 1u);
    return from_bits(u & 0xffff0000u);
  }
  // Stores the upper half of a value round_bf16 produced.
  static void store_bf16(uint16_t* x, float a) { *x = static_cast<uint16_t>(bits(a) >> 16); }
};

// A gradient element widened to fp32: floats as they are, bf16 bits exactly (<< 16).
template <class V>
inline typename V::reg load_grad(const float* x) { return V::load(x); }
template <class V>
inline typename V::reg load_grad(const uint16_t* x) { return V::load_bf16(x); }

template <class V, class T>
inline typename V::reg sum_grads(const T* const* g, int G, size_t i) {
  typename V::reg s = load_grad<V>(g[0] + i);
  for (int k = 1; k < G; ++k) s = V::add(s, load_grad<V>(g[k] + i));  // fixed order: deterministic
  return s;
}

// True when every summed element in [b, e) is finite. (s - s) is 0 for finite s and NaN for
// inf/NaN, so one add per vector accumulates the verdict and a single test ends the range.
template <class V, class T>
bool range_finite_t(const T* const* g, int G, size_t b, size_t e) {
  typename V::reg acc = V::zero();
  size_t i = b;
  for (; i + V::width <= e; i += V::width) {
    typename V::reg s = sum_grads<V>(g, G, i);
    acc = V::add(acc, V::sub(s, s));
  }
  if (V::any_nan(acc)) return false;
  for (; i < e; ++i)
    if (!std::isfinite(sum_grads<ScalarVec>(g, G, i))) return false;
  return true;
}

// Writes the summed gradients of [b, e) to dst (streaming stores: dst is read once, much later)
// and returns whether all of them are finite. Used when G >= 3, so the Adam pass reads one
// fp32 buffer instead of G gradients.
template <class V, class T>
bool range_sum_t(const T* const* g, int G, float* dst, size_t b, size_t e) {
  typename V::reg acc = V::zero();
  size_t i = b;
  for (; i + V::width <= e; i += V::width) {
    typename V::reg s = sum_grads<V>(g, G, i);
    acc = V::add(acc, V::sub(s, s));
    V::store_out(dst + i, s);
  }
  V::fence();  // streaming stores are weakly ordered: publish them before the pool's hand-off
  bool ok = !V::any_nan(acc);
  for (; i < e; ++i) {
    float s = sum_grads<ScalarVec>(g, G, i);
    ok = ok && std::isfinite(s);
    dst[i] = s;
  }
  return ok;
}

// Copies src[b, e) to dst (streaming stores) and returns max |x| over the range, or +inf when
// an element is inf or NaN: the pusher's bound that lets the server skip its check pass.
template <class V>
float range_copy_absmax_t(float* dst, const float* src, size_t b, size_t e) {
  typename V::reg mx = V::zero(), bad = V::zero();
  size_t i = b;
  for (; i + V::width <= e; i += V::width) {
    typename V::reg x = V::load(src + i);
    V::store_out(dst + i, x);
    bad = V::add(bad, V::sub(x, x));  // NaN once any element is not finite
    mx = V::max(mx, V::abs(x));
  }
  V::fence();
  float m = V::hmax(mx);
  bool finite = !V::any_nan(bad);
  for (; i < e; ++i) {
    float x = src[i];
    dst[i] = x;
    finite = finite && std::isfinite(x);
    m = std::max(m, std::fabs(x));
  }
  return finite ? m : INFINITY;
}

// The same push into a bf16 slot: src[b, e) rounded to nearest even, and the bound measured on
// the rounded values (what the server will sum), so a float that rounds up to inf gives +inf.
template <class V>
float range_copy_bf16_absmax_t(uint16_t* dst, const float* src, size_t b, size_t e) {
  typename V::reg mx = V::zero(), bad = V::zero();
  size_t i = b;
  for (; i + V::width <= e; i += V::width) {
    typename V::reg r = V::round_bf16(V::load(src + i));
    V::store_bf16(dst + i, r);
    bad = V::add(bad, V::sub(r, r));
    mx = V::max(mx, V::abs(r));
  }
  V::fence();
  float m = V::hmax(mx);
  bool finite = !V::any_nan(bad);
  for (; i < e; ++i) {
    float r = ScalarVec::round_bf16(src[i]);
    ScalarVec::store_bf16(dst + i, r);
    finite = finite && std::isfinite(r);
    m = std::max(m, std::fabs(r));
  }
  return finite ? m : INFINITY;
}

// kSeparate: p_out is not p, so the new parameters go out with streaming stores (this pass never
// reads them back) and p is only read; in place they are stored over the line just loaded.
template <class V, bool kSeparate, class T>
inline void adam_one(const float* p, float* p_out, float* m, float* v, const T* const* g, int G,
                     float* out, size_t i, const pyasgd::AdamScalars& c) {
  using R = typename V::reg;
  R gs = sum_grads<V>(g, G, i);
  R pv = V::load(p + i);
  if (c.l2 != 0.0f) gs = V::fmadd(V::set1(c.l2), pv, gs);  // g + wd*p (Adam's L2)
  R mv = V::load(m + i);
  mv = V::fmadd(V::set1(c.one_minus_beta1), V::sub(gs, mv), mv);  // m = lerp(m, g, 1-b1)
  R vv = V::load(v + i);
  vv = V::fmadd(V::mul(V::set1(c.one_minus_beta2), gs), gs, V::mul(V::set1(c.beta2), vv));  // v
  // sqrt(v_hat) + eps. Divided as torch.optim.Adam and the CUDA kernel do: multiplying by the
  // reciprocal rounds twice and would differ from them in the last bit.
  R denom = V::add(V::div(V::sqrt(vv), V::set1(c.bias_correction2_sqrt)), V::set1(c.eps));
  if (c.decay != 1.0f) pv = V::mul(pv, V::set1(c.decay));  // AdamW
  pv = V::add(pv, V::div(V::mul(V::set1(c.neg_step_size), mv), denom));  // p -= lr * m_hat / denom
  V::store(m + i, mv);
  V::store(v + i, vv);
  if constexpr (kSeparate) V::store_out(p_out + i, pv);
  else V::store(p_out + i, pv);
  if (out) V::store_out(out + i, pv);
}

template <class V, class S, bool kSeparate, class T>
void adam_loop(const float* p, float* p_out, float* m, float* v, const T* const* g, int G,
               float* out, size_t b, size_t e, const pyasgd::AdamScalars& c) {
  size_t i = b;
  // Software prefetch kPrefetch elements ahead in each of the G + 3 read streams: with 7-10
  // streams per thread the hardware prefetcher alone left the P = 25M, G = 4 step at 1.05-1.14x
  // torch.compile; 4 KB ahead gave 1.15-1.24x in the same runs (benchmarks/RESULTS.md).
  constexpr size_t D = pyasgd::cpu::kPrefetch;
  for (; i + V::width <= e; i += V::width) {
    if (i + D < e) {
      for (int k = 0; k < G; ++k) __builtin_prefetch(g[k] + i + D, 0, 3);
      __builtin_prefetch(p + i + D, 0, 3);
      __builtin_prefetch(m + i + D, 1, 3);
      __builtin_prefetch(v + i + D, 1, 3);
    }
    adam_one<V, kSeparate>(p, p_out, m, v, g, G, out, i, c);
  }
  for (; i < e; ++i) adam_one<S, kSeparate>(p, p_out, m, v, g, G, out, i, c);
  V::fence();
}

template <class V, class S, class T>
void adam_range_t(const float* p, float* p_out, float* m, float* v, const T* const* g, int G,
                  float* out, size_t b, size_t e, const pyasgd::AdamScalars& c) {
  if (p_out == p) adam_loop<V, S, false>(p, p_out, m, v, g, G, out, b, e, c);
  else adam_loop<V, S, true>(p, p_out, m, v, g, G, out, b, e, c);
}

// The ISA's kernel table. Instantiated inside the including file's anonymous namespace, so the
// function pointers refer to this ISA's internal copies and no other.
template <class V>
constexpr pyasgd::cpu::IsaKernels make_isa_kernels(const char* name) {
  return {name,
          {range_finite_t<V, float>, range_sum_t<V, float>, adam_range_t<V, ScalarVec, float>},
          {range_finite_t<V, uint16_t>, range_sum_t<V, uint16_t>,
           adam_range_t<V, ScalarVec, uint16_t>},
          range_copy_absmax_t<V>,
          range_copy_bf16_absmax_t<V>};
}
