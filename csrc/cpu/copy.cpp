// Threaded CPU copies for the shared region (see copy.h): tiles over the thread pool, with the
// push's bound measured by the ISA table's copy_absmax kernel.
#include "cpu/copy.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/thread_pool.h"

namespace pyasgd {

float copy_absmax_cpu(float* dst, const float* src, size_t n) {
  const cpu::IsaKernels& k = cpu::isa();
  if (n < cpu::kParallelMin) return k.copy_absmax(dst, src, 0, n);
  const size_t tiles = (n + cpu::kTile - 1) / cpu::kTile;
  std::vector<float> part(tiles);
  cpu::pool().run(tiles, [&](size_t t) {
    part[t] = k.copy_absmax(dst, src, t * cpu::kTile, std::min(n, (t + 1) * cpu::kTile));
  });
  return *std::max_element(part.begin(), part.end());
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
