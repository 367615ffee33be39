// Threaded CPU copies for the shared region (see copy.h): tiles over the thread pool, with the
// push's bound measured by the ISA table's copy_absmax (fp32) or copy_bf16_absmax kernel.
#include "cpu/copy.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/thread_pool.h"

namespace pyasgd {

namespace {

// Runs a copy-and-bound kernel over tiles of the thread pool; the bound is the tiles' max.
template <class D>
float tiled_copy_absmax(float (*kernel)(D*, const float*, size_t, size_t), D* dst,
                        const float* src, size_t n) {
  if (n < cpu::kParallelMin) return kernel(dst, src, 0, n);
  const size_t tiles = (n + cpu::kTile - 1) / cpu::kTile;
  std::vector<float> part(tiles);
  cpu::pool().run(tiles, [&](size_t t) {
    part[t] = kernel(dst, src, t * cpu::kTile, std::min(n, (t + 1) * cpu::kTile));
  });
  return *std::max_element(part.begin(), part.end());
}

}  // namespace

float copy_absmax_cpu(float* dst, const float* src, size_t n) {
  return tiled_copy_absmax(cpu::isa().copy_absmax, dst, src, n);
}

float copy_bf16_absmax_cpu(uint16_t* dst, const float* src, size_t n) {
  return tiled_copy_absmax(cpu::isa().copy_bf16_absmax, dst, src, n);
}

void parallel_copy(float* dst, const float* src, size_t n) {
  constexpr size_t kChunk = 1 << 18;  // 1 MiB
  if (n < 4 * kChunk) {
    std::memcpy(dst, src, n * sizeof(float));
    return;
  }
  size_t chunks = (n + kChunk - 1) / kChunk;
  cpu::pool().run(chunks, [&](size_t c) {
    size_t b = c * kChunk, e = std::min(n, b + kChunk);
    std::memcpy(dst + b, src + b, (e - b) * sizeof(float));
  });
}

}  // namespace pyasgd
