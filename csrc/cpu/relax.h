// cpu_relax(): the spin-wait hint for busy loops, per architecture, with no ISA flags needed.
#pragma once

namespace pyasgd {

// Tells the core it is spinning: frees pipeline resources for a sibling hyper-thread and, on
// x86, avoids the memory-order mis-speculation penalty when the awaited word changes.
inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__) || defined(__arm__)
  asm volatile("yield" ::: "memory");
#endif
}

}  // namespace pyasgd
