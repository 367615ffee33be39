// Portable scalar instantiation of the CPU Adam kernel: the fallback on x86 CPUs without AVX2
// and the only kernel on other architectures (aarch64).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include "cpu/kernels.h"

namespace {
#include "cpu/adam_kernel.inl"
}  // namespace

namespace pyasgd::cpu {
const IsaKernels& isa_scalar() { static const auto k = make_isa_kernels<ScalarVec>("scalar"); return k; }
}  // namespace pyasgd::cpu
