// The CPU kernel body, written once over a vector type V and included by each SIMD translation
// unit (adam_avx512.cpp, adam_avx2.cpp, adam_scalar.cpp) inside an anonymous namespace, so every
// instantiation keeps internal linkage and the linker can never mix code built for another ISA.
// The scalar tail uses the same operation sequence (explicit fma) as the vector body, and the
// build turns off FP contraction, so an element's result does not depend on its position.
//
// Requires: #include "cpu/kernels.h" and a vector struct V with width/load/store/store_out/set1/
// zero/add/sub/mul/div/sqrt/fmadd/max/abs/hmax/any_nan/fence (ScalarVec below is the model).
// Export the ISA with make_isa_kernels<V>(name): the one place that lists the kernels.

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
};

template <class V>
inline typename V::reg sum_grads(const float* const* g, int G, size_t i) {
  typename V::reg s = V::load(g[0] + i);
  for (int k = 1; k < G; ++k) s = V::add(s, V::load(g[k] + i));  // fixed order: deterministic
  return s;
}

// True when every summed element in [b, e) is finite. (s - s) is 0 for finite s and NaN for
// inf/NaN, so one add per vector accumulates the verdict and a single test ends the range.
template <class V>
bool range_finite_t(const float* const* g, int G, size_t b, size_t e) {
  typename V::reg acc = V::zero();
  size_t i = b;
  for (; i + V::width <= e; i += V::width) {
    typename V::reg s = sum_grads<V>(g, G, i);
    acc = V::add(acc, V::sub(s, s));
  }
  if (V::any_nan(acc)) return false;
  for (; i < e; ++i) {
    float s = g[0][i];
    for (int k = 1; k < G; ++k) s += g[k][i];
    if (!std::isfinite(s)) return false;
  }
  return true;
}

// Writes the summed gradients of [b, e) to dst (streaming stores: dst is read once, much later)
// and returns whether all of them are finite. Used when G >= 3, so the Adam pass reads one
// buffer instead of G.
template <class V>
bool range_sum_t(const float* const* g, int G, float* dst, size_t b, size_t e) {
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
    float s = g[0][i];
    for (int k = 1; k < G; ++k) s += g[k][i];
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

template <class V>
inline void adam_one(float* p, float* m, float* v, const float* const* g, int G, float* out,
                     size_t i, const pyasgd::AdamScalars& c) {
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
  V::store(p + i, pv);
  if (out) V::store_out(out + i, pv);
}

template <class V, class S>
void adam_range_t(float* p, float* m, float* v, const float* const* g, int G, float* out, size_t b,
                  size_t e, const pyasgd::AdamScalars& c) {
  size_t i = b;
  for (; i + V::width <= e; i += V::width) adam_one<V>(p, m, v, g, G, out, i, c);
  for (; i < e; ++i) adam_one<S>(p, m, v, g, G, out, i, c);
  V::fence();
}

// The ISA's kernel table. Instantiated inside the including file's anonymous namespace, so the
// function pointers refer to this ISA's internal copies and no other.
template <class V>
constexpr pyasgd::cpu::IsaKernels make_isa_kernels(const char* name) {
  return {name, range_finite_t<V>, range_sum_t<V>, adam_range_t<V, ScalarVec>,
          range_copy_absmax_t<V>};
}
