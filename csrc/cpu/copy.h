// Threaded CPU copies into and out of the shared region: the push (copy + max |x| bound in one
// pass; to fp32 or rounded to bf16) and the pull (plain copy).
#pragma once
#include <cstddef>
#include <cstdint>

namespace pyasgd {

// Copies n floats and returns max |x| (+inf when an element is not finite), in one pass.
float copy_absmax_cpu(float* dst, const float* src, size_t n);

// Rounds n floats to bf16 (nearest even; NaN stays NaN, inf inf, and a finite value may round up
// to inf) into dst, returning max |rounded value| (+inf when one is not finite), in one pass.
float copy_bf16_absmax_cpu(uint16_t* dst, const float* src, size_t n);

// memcpy of n floats, split across the CPU thread pool when large.
void parallel_copy(float* dst, const float* src, size_t n);

}  // namespace pyasgd
