// The fused "sum G gradients + Adam" update: the one header both device back ends implement.
// Step-dependent scalars are computed once on the host (AdamScalars) so kernels only multiply.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>

namespace pyasgd {

struct AdamHyper {
  double lr, beta1, beta2, eps, weight_decay;
  long long step;  // 1-based step this update produces
  bool decoupled;  // AdamW: decay the parameter, not the gradient
};

// Mirrors torch.optim.Adam's single-tensor arithmetic so results agree to rounding.
struct AdamScalars {
  float one_minus_beta1;  // lerp weight for m
  float beta2, one_minus_beta2;
  float bias_correction2_sqrt;  // sqrt(1 - beta2^t)
  float eps;
  float neg_step_size;  // -lr / (1 - beta1^t)
  float l2;             // weight decay added to the gradient (0 when decoupled)
  float decay;          // parameter multiplier (1 - lr*wd when decoupled, else 1)
};

inline AdamScalars make_scalars(const AdamHyper& h) {
  AdamScalars s;
  const double t = static_cast<double>(h.step);
  s.one_minus_beta1 = static_cast<float>(1.0 - h.beta1);
  s.beta2 = static_cast<float>(h.beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - h.beta2);
  s.bias_correction2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(h.beta2, t)));
  s.eps = static_cast<float>(h.eps);
  s.neg_step_size = static_cast<float>(-h.lr / (1.0 - std::pow(h.beta1, t)));
  s.l2 = h.decoupled ? 0.0f : static_cast<float>(h.weight_decay);
  s.decay = h.decoupled ? static_cast<float>(1.0 - h.lr * h.weight_decay) : 1.0f;
  return s;
}

// All buffers are flat fp32 of n elements, except the gradients, which are fp32 or bf16 (raw
// bits, uint16_t): each bf16 value is widened to fp32 exactly (bits << 16) and grads[0..G) are
// summed in fp32 in index order, so bf16 gradients give the fp32 result of their widened values.
// The parameters are read from param and the new ones written to param_out, which is either
// param itself (in place) or a distinct buffer (param is then never written: the server reads
// the published buffer and writes the back buffer). out (may be null) gets a copy of the new
// parameters. workspace (n floats, may be null) lets G >= 3 be summed once instead of read
// twice. Returns false, writing nothing but the workspace, when a summed element is not finite.
// assume_finite: the caller has proved every summed element finite (bounds from the pushers),
// so the check pass is skipped and the update is one pass over memory.
bool adam_step_cpu(const float* param, float* param_out, float* m, float* v,
                   const float* const* grads, int G, size_t n, float* out, float* workspace,
                   const AdamHyper& h, bool assume_finite = false);
bool adam_step_cpu(const float* param, float* param_out, float* m, float* v,
                   const uint16_t* const* grads, int G, size_t n, float* out, float* workspace,
                   const AdamHyper& h, bool assume_finite = false);

// SIMD level chosen at run time for this CPU ("avx512", "avx2" or "scalar").
const char* cpu_simd_level();
int cpu_num_threads();
void cpu_set_num_threads(int n);

#ifdef PYASGD_WITH_CUDA
// Same contract on device pointers (grads may be mapped pinned host memory), on `stream`.
// With assume_finite the update is only queued on `stream` (no allocation, no synchronisation):
// work ordered after it on that stream sees its result, but the host must synchronise the stream
// before it reuses the gradient buffers (releases their slots) or reads what was written.
// Otherwise the check pass runs and the call waits for its verdict, so everything is done on return.
bool adam_step_cuda(const float* param, float* param_out, float* m, float* v,
                    const float* const* grads, int G, size_t n, float* out, float* workspace,
                    const AdamHyper& h, int device, void* stream, bool assume_finite = false);
bool adam_step_cuda(const float* param, float* param_out, float* m, float* v,
                    const uint16_t* const* grads, int G, size_t n, float* out, float* workspace,
                    const AdamHyper& h, int device, void* stream, bool assume_finite = false);
// The GPU pusher's copy: n floats from device memory src to dst (mapped pinned host memory, a
// gradient slot), returning max |x| (+inf when an element is not finite), measured in the same
// pass. Synchronises `stream`: the slot is complete on return and may be committed.
float cuda_copy_absmax(float* dst, const float* src, size_t n, int device, void* stream);
// The same into a bf16 slot: each value rounded to nearest even (NaN stays NaN, inf inf; a
// finite value may round up to inf), returning max |rounded value| (+inf when one is not finite).
float cuda_copy_bf16_absmax(uint16_t* dst, const float* src, size_t n, int device, void* stream);
constexpr int kCudaMaxGrads = 64;  // gradient pointers travel in the kernel's argument block
int cuda_device_count();
void cuda_host_register(void* ptr, size_t bytes);
void cuda_host_unregister(void* ptr);
#endif

}  // namespace pyasgd
