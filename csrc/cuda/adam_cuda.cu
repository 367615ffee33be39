// CUDA back end of the fused update: the same check pass + Adam pass as the CPU, as elementwise
// kernels over flat buffers with 16-byte loads where every pointer allows it. Gradient sources
// may be device memory or mapped pinned host memory (UVA makes both plain pointers here).
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "adam.h"

namespace pyasgd {
namespace {

#define PYASGD_CUDA_CHECK(expr)                                                        \
  do {                                                                                 \
    cudaError_t err_ = (expr);                                                         \
    if (err_ != cudaSuccess)                                                           \
      throw std::runtime_error(std::string("pyasgd CUDA error: ") +                    \
                               cudaGetErrorString(err_) + " (" #expr ")");             \
  } while (0)

struct GradPtrs {
  const float* p[kCudaMaxGrads];
};

constexpr int kThreads = 256;

template <int W>
struct Pack {
  float x[W];
};

template <int W>
__device__ __forceinline__ Pack<W> load(const float* p, size_t i) {
  Pack<W> r;
  if constexpr (W == 4) {
    float4 t = *reinterpret_cast<const float4*>(p + i);
    r.x[0] = t.x, r.x[1] = t.y, r.x[2] = t.z, r.x[3] = t.w;
  } else {
    r.x[0] = p[i];
  }
  return r;
}

template <int W>
__device__ __forceinline__ void store(float* p, size_t i, const Pack<W>& r) {
  if constexpr (W == 4) {
    *reinterpret_cast<float4*>(p + i) = make_float4(r.x[0], r.x[1], r.x[2], r.x[3]);
  } else {
    p[i] = r.x[0];
  }
}

template <int W>
__device__ __forceinline__ Pack<W> sum_grads(const GradPtrs& g, int G, size_t i) {
  Pack<W> s = load<W>(g.p[0], i);
  for (int k = 1; k < G; ++k) {  // fixed order: deterministic, and equal to the CPU's sum
    Pack<W> t = load<W>(g.p[k], i);
#pragma unroll
    for (int j = 0; j < W; ++j) s.x[j] = __fadd_rn(s.x[j], t.x[j]);
  }
  return s;
}

// Pass 1: flag a non-finite summed element; with dst, also store the sums for pass 2.
template <int W>
__global__ void sum_check_kernel(GradPtrs g, int G, size_t base, size_t packs, float* dst, int* bad) {
  size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x;
  if (i >= packs) return;
  size_t off = base + i * W;
  Pack<W> s = sum_grads<W>(g, G, off);
  bool ok = true;
#pragma unroll
  for (int j = 0; j < W; ++j) ok = ok && isfinite(s.x[j]);
  if (!ok) *bad = 1;  // every writer stores the same value: no atomic needed
  if (dst) store<W>(dst, off, s);
}

// Pass 2: the same arithmetic, in the same order, as csrc/cpu/adam_kernel.inl.
template <int W>
__global__ void adam_kernel(float* __restrict__ p, float* __restrict__ m, float* __restrict__ v,
                            GradPtrs g, int G, size_t base, size_t packs, float* __restrict__ out,
                            AdamScalars c, const int* bad) {
  if (*bad) return;  // skipped step: nothing is written
  size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x;
  if (i >= packs) return;
  size_t off = base + i * W;
  Pack<W> gs = sum_grads<W>(g, G, off);
  Pack<W> pv = load<W>(p, off), mv = load<W>(m, off), vv = load<W>(v, off);
#pragma unroll
  for (int j = 0; j < W; ++j) {
    float gj = gs.x[j];
    if (c.l2 != 0.0f) gj = __fmaf_rn(c.l2, pv.x[j], gj);                            // g + wd*p
    mv.x[j] = __fmaf_rn(c.one_minus_beta1, __fsub_rn(gj, mv.x[j]), mv.x[j]);        // m
    vv.x[j] = __fmaf_rn(__fmul_rn(c.one_minus_beta2, gj), gj, __fmul_rn(c.beta2, vv.x[j]));  // v
    float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vv.x[j]), c.bias_correction2_sqrt), c.eps);
    float pj = pv.x[j];
    if (c.decay != 1.0f) pj = __fmul_rn(pj, c.decay);                                 // AdamW
    pv.x[j] = __fadd_rn(pj, __fdiv_rn(__fmul_rn(c.neg_step_size, mv.x[j]), denom));  // p
  }
  store<W>(m, off, mv);
  store<W>(v, off, vv);
  store<W>(p, off, pv);
  if (out) store<W>(out, off, pv);
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Launches kernel<4> over the 16-byte-aligned bulk and kernel<1> over the tail.
template <class Launch4, class Launch1>
void launch_split(size_t n, bool vec, Launch4 l4, Launch1 l1) {
  size_t n4 = vec ? n / 4 : 0;
  if (n4) l4(size_t{0}, n4, static_cast<unsigned>((n4 + kThreads - 1) / kThreads));
  size_t rest = n - n4 * 4;
  if (rest) l1(n4 * 4, rest, static_cast<unsigned>((rest + kThreads - 1) / kThreads));
}

struct DeviceGuard {
  int prev = -1;
  explicit DeviceGuard(int device) {
    PYASGD_CUDA_CHECK(cudaGetDevice(&prev));
    if (prev != device) PYASGD_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceGuard() {
    int cur;
    if (cudaGetDevice(&cur) == cudaSuccess && cur != prev) cudaSetDevice(prev);
  }
};

}  // namespace

bool adam_step_cuda(float* param, float* m, float* v, const float* const* grads, int G, size_t n,
                    float* out, float* workspace, const AdamHyper& h, int device, void* stream_ptr,
                    bool assume_finite) {
  if (G < 1 || G > kCudaMaxGrads) throw std::invalid_argument("adam_step_cuda: G out of range");
  DeviceGuard guard(device);
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const AdamScalars c = make_scalars(h);
  GradPtrs gp{};
  bool vec = aligned16(param) && aligned16(m) && aligned16(v) && (!out || aligned16(out)) &&
             (!workspace || aligned16(workspace));
  for (int k = 0; k < G; ++k) {
    gp.p[k] = grads[k];
    vec = vec && aligned16(grads[k]);
  }
  const bool presum = !assume_finite && workspace != nullptr && G >= 3;  // see adam_cpu.cpp

  int* bad = nullptr;
  PYASGD_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&bad), sizeof(int), stream));
  PYASGD_CUDA_CHECK(cudaMemsetAsync(bad, 0, sizeof(int), stream));
  float* dst = presum ? workspace : nullptr;
  if (!assume_finite) launch_split(
      n, vec,
      [&](size_t b, size_t packs, unsigned blocks) {
        sum_check_kernel<4><<<blocks, kThreads, 0, stream>>>(gp, G, b, packs, dst, bad);
      },
      [&](size_t b, size_t packs, unsigned blocks) {
        sum_check_kernel<1><<<blocks, kThreads, 0, stream>>>(gp, G, b, packs, dst, bad);
      });
  PYASGD_CUDA_CHECK(cudaGetLastError());

  GradPtrs ap = gp;
  int aG = G;
  if (presum) {
    ap = GradPtrs{};
    ap.p[0] = workspace;
    aG = 1;
  }
  launch_split(
      n, vec,
      [&](size_t b, size_t packs, unsigned blocks) {
        adam_kernel<4><<<blocks, kThreads, 0, stream>>>(param, m, v, ap, aG, b, packs, out, c, bad);
      },
      [&](size_t b, size_t packs, unsigned blocks) {
        adam_kernel<1><<<blocks, kThreads, 0, stream>>>(param, m, v, ap, aG, b, packs, out, c, bad);
      });
  PYASGD_CUDA_CHECK(cudaGetLastError());

  int host_bad = 0;
  PYASGD_CUDA_CHECK(cudaMemcpyAsync(&host_bad, bad, sizeof(int), cudaMemcpyDeviceToHost, stream));
  PYASGD_CUDA_CHECK(cudaFreeAsync(bad, stream));
  PYASGD_CUDA_CHECK(cudaStreamSynchronize(stream));  // the caller needs the verdict now
  return host_bad == 0;
}

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // no driver or no device: clear the sticky error, report none
    return 0;
  }
  return n;
}

void cuda_host_register(void* ptr, size_t bytes) {
  PYASGD_CUDA_CHECK(cudaHostRegister(ptr, bytes, cudaHostRegisterPortable | cudaHostRegisterMapped));
}

void cuda_host_unregister(void* ptr) { PYASGD_CUDA_CHECK(cudaHostUnregister(ptr)); }

}  // namespace pyasgd
