// Threaded CPU copies into and out of the shared region: the push (copy + max |x| bound in one
// pass) and the pull (plain copy).
#pragma once
#include <cstddef>

namespace pyasgd {

// Copies n floats and returns max |x| (+inf when an element is not finite), in one pass.
float copy_absmax_cpu(float* dst, const float* src, size_t n);

// memcpy of n floats, split across the CPU thread pool when large.
void parallel_copy(float* dst, const float* src, size_t n);

}  // namespace pyasgd
