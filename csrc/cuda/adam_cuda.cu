// CUDA back end of the fused update: the same check pass + Adam pass as the CPU, as elementwise
// kernels over flat buffers with 16-byte loads (8 for bf16 gradients) where every pointer allows
// it. Gradient sources may be device memory or mapped pinned host memory (UVA: plain pointers).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

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

// Gradients of one type T: float, or uint16_t holding bf16 bits (widened exactly, bits << 16).
template <class T>
struct GradPtrs {
  const T* p[kCudaMaxGrads];
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

// W bf16 values widened to fp32: exact, the bf16 bits are the float's upper half.
template <int W>
__device__ __forceinline__ Pack<W> load(const uint16_t* p, size_t i) {
  Pack<W> r;
  if constexpr (W == 4) {
    uint2 t = *reinterpret_cast<const uint2*>(p + i);  // 8 bytes: 4 values
    r.x[0] = __uint_as_float(t.x << 16), r.x[1] = __uint_as_float(t.x & 0xffff0000u);
    r.x[2] = __uint_as_float(t.y << 16), r.x[3] = __uint_as_float(t.y & 0xffff0000u);
  } else {
    r.x[0] = __uint_as_float(static_cast<unsigned>(p[i]) << 16);
  }
  return r;
}

template <int W, class T>
__device__ __forceinline__ Pack<W> sum_grads(const GradPtrs<T>& g, int G, size_t i) {
  Pack<W> s = load<W>(g.p[0], i);
  for (int k = 1; k < G; ++k) {  // fixed order: deterministic, and equal to the CPU's sum
    Pack<W> t = load<W>(g.p[k], i);
#pragma unroll
    for (int j = 0; j < W; ++j) s.x[j] = __fadd_rn(s.x[j], t.x[j]);
  }
  return s;
}

// Pass 1: flag a non-finite summed element; with dst, also store the sums for pass 2.
template <int W, class T>
__global__ void sum_check_kernel(GradPtrs<T> g, int G, size_t base, size_t packs, float* dst, int* bad) {
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

// Pass 2: the same arithmetic, in the same order, as csrc/cpu/adam_kernel.inl. bad is null when
// the caller proved the sum finite (no check pass ran). p is only read and p_out written: they
// are the same buffer for an update in place, so neither is __restrict__.
template <int W, class T>
__global__ void adam_kernel(const float* p, float* p_out, float* __restrict__ m,
                            float* __restrict__ v, GradPtrs<T> g, int G, size_t base, size_t packs,
                            float* __restrict__ out, AdamScalars c, const int* bad) {
  if (bad && *bad) return;  // skipped step: nothing is written
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
  store<W>(p_out, off, pv);
  if (out) store<W>(out, off, pv);
}

// Block-wide max of each thread's mx (float bits); one atomic per block reaches *result.
__device__ __forceinline__ void block_max_to(unsigned mx, unsigned* result) {
  __shared__ unsigned warp_max[kThreads / 32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x / 32] = mx;
  __syncthreads();
  if (threadIdx.x < 32) {
    mx = threadIdx.x < blockDim.x / 32 ? warp_max[threadIdx.x] : 0u;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    if (threadIdx.x == 0 && mx != 0) atomicMax(result, mx);
  }
}

// The push: copies src to dst (mapped pinned host memory, written over the bus) and folds
// max |x| into *result as bits. Non-negative floats order as their bit patterns do, so an unsigned
// atomicMax is a float max; a non-finite element counts as +inf (NaN's bits would exceed inf's).
template <int W>
__global__ void copy_absmax_kernel(float* __restrict__ dst, const float* __restrict__ src,
                                   size_t base, size_t packs, unsigned* result) {
  constexpr unsigned kInfBits = 0x7f800000u;
  unsigned mx = 0;
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < packs; i += stride) {
    size_t off = base + i * W;
    Pack<W> x = load<W>(src, off);
    store<W>(dst, off, x);
#pragma unroll
    for (int j = 0; j < W; ++j) {
      float a = fabsf(x.x[j]);
      mx = max(mx, isfinite(a) ? __float_as_uint(a) : kInfBits);
    }
  }
  block_max_to(mx, result);
}

// fp32 -> the nearest bf16 (ties to even), as the fp32 bits of the same value (low half zero):
// the rule of ScalarVec::round_bf16 in csrc/cpu/adam_kernel.inl, so both devices store the same
// bits. A NaN keeps its sign and gets the quiet bit; a finite value past bf16's largest -> inf.
__device__ __forceinline__ unsigned round_bf16_bits(float x) {
  unsigned u = __float_as_uint(x);
  u = isnan(x) ? (u | 0x00400000u) : u + 0x7fffu + ((u >> 16) & 1u);
  return u & 0xffff0000u;
}

// The push into a bf16 slot: rounds src, stores the upper halves to dst and folds
// max |rounded| into *result as bits (as copy_absmax_kernel; non-finite counts as +inf).
template <int W>
__global__ void copy_bf16_absmax_kernel(uint16_t* __restrict__ dst, const float* __restrict__ src,
                                        size_t base, size_t packs, unsigned* result) {
  constexpr unsigned kInfBits = 0x7f800000u;
  unsigned mx = 0;
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < packs; i += stride) {
    size_t off = base + i * W;
    Pack<W> x = load<W>(src, off);
    unsigned r[W];
#pragma unroll
    for (int j = 0; j < W; ++j) {
      r[j] = round_bf16_bits(x.x[j]);
      unsigned a = r[j] & 0x7fffffffu;  // |rounded|; above kInfBits only for NaN
      mx = max(mx, a < kInfBits ? a : kInfBits);
    }
    if constexpr (W == 4) {
      *reinterpret_cast<uint2*>(dst + off) =
          make_uint2((r[0] >> 16) | r[1], (r[2] >> 16) | r[3]);  // little-endian: [0] low half
    } else {
      dst[off] = static_cast<uint16_t>(r[0] >> 16);
    }
  }
  block_max_to(mx, result);
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }
bool aligned8(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 7) == 0; }

// Launches kernel<4> over the 16-byte-aligned bulk and kernel<1> over the tail.
template <class Launch4, class Launch1>
void launch_split(size_t n, bool vec, Launch4 l4, Launch1 l1) {
  size_t n4 = vec ? n / 4 : 0;
  if (n4) l4(size_t{0}, n4, static_cast<unsigned>((n4 + kThreads - 1) / kThreads));
  size_t rest = n - n4 * 4;
  if (rest) l1(n4 * 4, rest, static_cast<unsigned>((rest + kThreads - 1) / kThreads));
}

// Per-device scratch words, allocated once and kept for the life of the process, so a step
// allocates nothing. Each word has a device copy (written by kernels) and a pinned host copy
// (the target of an asynchronous read-back). A call holds the word's mutex from its reset to its
// read-back: concurrent calls on different streams of one device then take turns instead of
// resetting or reading each other's word. Calls that need the word synchronise anyway (the
// caller waits for the verdict), so the serialisation costs no overlap that existed.
struct Word {
  std::mutex mu;
  unsigned* dev = nullptr;
  unsigned* host = nullptr;
};

struct DeviceScratch {
  Word bad;     // the check pass's verdict (int on the device: nonzero = not finite)
  Word absmax;  // the push's max |x|, as float bits
  int blocks_cap = 0;  // a grid that fills the device; grid-stride loops cover the rest
};

// The calling thread has made `device` current.
DeviceScratch& scratch(int device) {
  static std::mutex mu;
  // Leaked on purpose: the CUDA context may be gone by the time static destructors would run.
  static auto* table = new std::vector<std::unique_ptr<DeviceScratch>>();
  std::lock_guard<std::mutex> lk(mu);
  if (table->empty()) {
    int count = 0;
    PYASGD_CUDA_CHECK(cudaGetDeviceCount(&count));
    table->resize(count);
  }
  if (device < 0 || device >= static_cast<int>(table->size()))
    throw std::invalid_argument("pyasgd CUDA: device " + std::to_string(device) + " out of range");
  std::unique_ptr<DeviceScratch>& slot = (*table)[device];
  if (!slot) {
    auto s = std::make_unique<DeviceScratch>();
    void* words = nullptr;
    void* host = nullptr;
    PYASGD_CUDA_CHECK(cudaMalloc(&words, 2 * sizeof(unsigned)));
    PYASGD_CUDA_CHECK(cudaMallocHost(&host, 2 * sizeof(unsigned)));
    s->bad.dev = static_cast<unsigned*>(words);
    s->absmax.dev = static_cast<unsigned*>(words) + 1;
    s->bad.host = static_cast<unsigned*>(host);
    s->absmax.host = static_cast<unsigned*>(host) + 1;
    int sms = 0;
    PYASGD_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    s->blocks_cap = sms * (2048 / kThreads);
    slot = std::move(s);
  }
  return *slot;
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

// Queues the Adam pass over the gradients g (or the check pass's fp32 sums) on `stream`.
template <class T>
void launch_adam(const float* param, float* param_out, float* m, float* v, const GradPtrs<T>& g,
                 int G, size_t n, float* out, const AdamScalars& c, bool vec, const int* bad,
                 cudaStream_t stream) {
  launch_split(
      n, vec,
      [&](size_t b, size_t packs, unsigned blocks) {
        adam_kernel<4><<<blocks, kThreads, 0, stream>>>(param, param_out, m, v, g, G, b, packs, out, c, bad);
      },
      [&](size_t b, size_t packs, unsigned blocks) {
        adam_kernel<1><<<blocks, kThreads, 0, stream>>>(param, param_out, m, v, g, G, b, packs, out, c, bad);
      });
  PYASGD_CUDA_CHECK(cudaGetLastError());
}

template <class T>
bool adam_step_cuda_t(const float* param, float* param_out, float* m, float* v,
                      const T* const* grads, int G, size_t n, float* out, float* workspace,
                      const AdamHyper& h, int device, void* stream_ptr, bool assume_finite) {
  if (G < 1 || G > kCudaMaxGrads) throw std::invalid_argument("adam_step_cuda: G out of range");
  DeviceGuard guard(device);
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const AdamScalars c = make_scalars(h);
  GradPtrs<T> gp{};
  // The 4-wide kernel loads 16 bytes of each fp32 buffer and 4 * sizeof(T) of each gradient.
  bool vec = aligned16(param) && aligned16(param_out) && aligned16(m) && aligned16(v) &&
             (!out || aligned16(out)) && (!workspace || aligned16(workspace));
  for (int k = 0; k < G; ++k) {
    gp.p[k] = grads[k];
    vec = vec && (sizeof(T) == 4 ? aligned16(grads[k]) : aligned8(grads[k]));
  }
  if (assume_finite) {  // proven finite: one pass, queued on the stream, nothing to wait for
    launch_adam(param, param_out, m, v, gp, G, n, out, c, vec, nullptr, stream);
    return true;
  }

  const bool presum = workspace != nullptr && G >= 3;  // see adam_cpu.cpp
  Word& w = scratch(device).bad;
  int* bad = reinterpret_cast<int*>(w.dev);
  std::lock_guard<std::mutex> lk(w.mu);  // until the verdict is read back (see DeviceScratch)
  PYASGD_CUDA_CHECK(cudaMemsetAsync(bad, 0, sizeof(int), stream));
  float* dst = presum ? workspace : nullptr;
  launch_split(
      n, vec,
      [&](size_t b, size_t packs, unsigned blocks) {
        sum_check_kernel<4><<<blocks, kThreads, 0, stream>>>(gp, G, b, packs, dst, bad);
      },
      [&](size_t b, size_t packs, unsigned blocks) {
        sum_check_kernel<1><<<blocks, kThreads, 0, stream>>>(gp, G, b, packs, dst, bad);
      });
  PYASGD_CUDA_CHECK(cudaGetLastError());
  if (presum) {  // the Adam pass reads the fp32 sums, whatever the gradients' type
    GradPtrs<float> sums{};
    sums.p[0] = workspace;
    launch_adam(param, param_out, m, v, sums, 1, n, out, c, vec, bad, stream);
  } else {
    launch_adam(param, param_out, m, v, gp, G, n, out, c, vec, bad, stream);
  }
  PYASGD_CUDA_CHECK(cudaMemcpyAsync(w.host, bad, sizeof(int), cudaMemcpyDeviceToHost, stream));
  PYASGD_CUDA_CHECK(cudaStreamSynchronize(stream));  // the caller needs the verdict now
  return *w.host == 0;
}

}  // namespace

bool adam_step_cuda(const float* param, float* param_out, float* m, float* v,
                    const float* const* grads, int G, size_t n, float* out, float* workspace,
                    const AdamHyper& h, int device, void* stream, bool assume_finite) {
  return adam_step_cuda_t(param, param_out, m, v, grads, G, n, out, workspace, h, device, stream,
                          assume_finite);
}

bool adam_step_cuda(const float* param, float* param_out, float* m, float* v,
                    const uint16_t* const* grads, int G, size_t n, float* out, float* workspace,
                    const AdamHyper& h, int device, void* stream, bool assume_finite) {
  return adam_step_cuda_t(param, param_out, m, v, grads, G, n, out, workspace, h, device, stream,
                          assume_finite);
}

namespace {
// The pushers' copy with its bound, for any slot type: KernelOf<V>::kernel is the kernel that
// moves V values per thread step (4 when both buffers are aligned for it, else 1).
template <template <int> class KernelOf, class T>
float copy_with_bound(T* dst, const float* src, size_t n, bool vec, int device, void* stream_ptr) {
  if (n == 0) return 0.0f;
  DeviceGuard guard(device);
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  DeviceScratch& s = scratch(device);
  Word& w = s.absmax;
  std::lock_guard<std::mutex> lk(w.mu);  // until the bound is read back (see DeviceScratch)
  PYASGD_CUDA_CHECK(cudaMemsetAsync(w.dev, 0, sizeof(unsigned), stream));  // bits of +0.0f
  auto grid = [&](unsigned blocks) { return std::min(blocks, static_cast<unsigned>(s.blocks_cap)); };
  launch_split(
      n, vec,
      [&](size_t b, size_t packs, unsigned blocks) {
        KernelOf<4>::kernel<<<grid(blocks), kThreads, 0, stream>>>(dst, src, b, packs, w.dev);
      },
      [&](size_t b, size_t packs, unsigned blocks) {
        KernelOf<1>::kernel<<<grid(blocks), kThreads, 0, stream>>>(dst, src, b, packs, w.dev);
      });
  PYASGD_CUDA_CHECK(cudaGetLastError());
  PYASGD_CUDA_CHECK(cudaMemcpyAsync(w.host, w.dev, sizeof(unsigned), cudaMemcpyDeviceToHost, stream));
  // The copy into the slot must be complete before the caller commits it.
  PYASGD_CUDA_CHECK(cudaStreamSynchronize(stream));
  float bound;
  std::memcpy(&bound, w.host, sizeof(bound));
  return bound;
}

template <int V>
struct Fp32Copy {
  static constexpr auto kernel = copy_absmax_kernel<V>;
};
template <int V>
struct Bf16Copy {
  static constexpr auto kernel = copy_bf16_absmax_kernel<V>;
};
}  // namespace

float cuda_copy_absmax(float* dst, const float* src, size_t n, int device, void* stream_ptr) {
  return copy_with_bound<Fp32Copy>(dst, src, n, aligned16(dst) && aligned16(src), device, stream_ptr);
}

float cuda_copy_bf16_absmax(uint16_t* dst, const float* src, size_t n, int device, void* stream_ptr) {
  // 4 values per step: 16 bytes in, 8 bytes out
  return copy_with_bound<Bf16Copy>(dst, src, n, aligned8(dst) && aligned16(src), device, stream_ptr);
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
