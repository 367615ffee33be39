// The one PYBIND11_MODULE: pyasgd._C. Entry points take raw addresses: the Python layer
// (pyasgd/optim.py, pyasgd/exchange.py) validates tensors and passes data_ptr()s, so this
// extension never links against torch and one build serves every torch version.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

#include "adam.h"
#include "cpu/copy.h"

namespace py = pybind11;
using pyasgd::AdamHyper;

namespace {
template <class T = float>
T* ptr(uintptr_t a) {
  return reinterpret_cast<T*>(a);
}

template <class T>
std::vector<const T*> grad_ptrs(const std::vector<uintptr_t>& grads) {
  std::vector<const T*> g;
  g.reserve(grads.size());
  for (auto a : grads) g.push_back(ptr<const T>(a));
  return g;
}

// Calls step(grads as const T* const*, G) with the gradients' type: fp32, or bf16 bits.
template <class Step>
bool with_grads(const std::vector<uintptr_t>& grads, bool bf16, Step step) {
  if (bf16) {
    auto g = grad_ptrs<uint16_t>(grads);
    return step(g.data(), static_cast<int>(g.size()));
  }
  auto g = grad_ptrs<float>(grads);
  return step(g.data(), static_cast<int>(g.size()));
}

AdamHyper hyper(long long step, double lr, double beta1, double beta2, double eps, double wd,
                bool decoupled) {
  return AdamHyper{lr, beta1, beta2, eps, wd, step, decoupled};
}
}  // namespace

void bind_region(py::module_& m);

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyasgd's compiled core: fused Adam kernels and the shared-memory exchange.";

  // param_out = 0: the update is in place (param_out is param). bf16_grads: the gradient
  // addresses hold bf16 (all of them), widened exactly and summed in fp32.
  m.def(
      "adam_step_cpu",
      [](uintptr_t p, uintptr_t mm, uintptr_t v, const std::vector<uintptr_t>& grads, size_t n,
         uintptr_t out, uintptr_t workspace, long long step, double lr, double beta1, double beta2,
         double eps, double wd, bool decoupled, bool assume_finite, uintptr_t param_out,
         bool bf16_grads) {
        const AdamHyper h = hyper(step, lr, beta1, beta2, eps, wd, decoupled);
        float* dst = ptr(param_out ? param_out : p);
        return with_grads(grads, bf16_grads, [&](auto g, int G) {
          return pyasgd::adam_step_cpu(ptr(p), dst, ptr(mm), ptr(v), g, G, n, ptr(out),
                                       ptr(workspace), h, assume_finite);
        });
      },
      py::arg("param"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("grads"), py::arg("n"),
      py::arg("out"), py::arg("workspace"), py::arg("step"), py::arg("lr"), py::arg("beta1"),
      py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("decoupled"),
      py::arg("assume_finite"), py::arg("param_out") = 0, py::arg("bf16_grads") = false,
      py::call_guard<py::gil_scoped_release>(),
      "Fused sum-of-gradients + Adam on CPU buffers (addresses); False = skipped, non-finite.");
  m.def(
      "copy_bf16_absmax_cpu",
      [](uintptr_t dst, uintptr_t src, size_t n) {
        return pyasgd::copy_bf16_absmax_cpu(ptr<uint16_t>(dst), ptr<const float>(src), n);
      },
      py::arg("dst"), py::arg("src"), py::arg("n"), py::call_guard<py::gil_scoped_release>(),
      "Rounds n floats to bf16 (nearest even) into dst; returns max |rounded| (+inf: not finite).");
  m.def("cpu_simd_level", &pyasgd::cpu_simd_level);
  m.def("cpu_num_threads", &pyasgd::cpu_num_threads);
  m.def("cpu_set_num_threads", &pyasgd::cpu_set_num_threads);

#ifdef PYASGD_WITH_CUDA
  m.attr("cuda_built") = true;
  m.attr("cuda_archs") = PYASGD_CUDA_ARCHS;
  m.attr("cuda_max_grads") = pyasgd::kCudaMaxGrads;
  m.def(
      "adam_step_cuda",
      [](uintptr_t p, uintptr_t mm, uintptr_t v, const std::vector<uintptr_t>& grads, size_t n,
         uintptr_t out, uintptr_t workspace, long long step, double lr, double beta1, double beta2,
         double eps, double wd, bool decoupled, int device, uintptr_t stream, bool assume_finite,
         uintptr_t param_out, bool bf16_grads) {
        const AdamHyper h = hyper(step, lr, beta1, beta2, eps, wd, decoupled);
        float* dst = ptr(param_out ? param_out : p);
        return with_grads(grads, bf16_grads, [&](auto g, int G) {
          return pyasgd::adam_step_cuda(ptr(p), dst, ptr(mm), ptr(v), g, G, n, ptr(out),
                                        ptr(workspace), h, device, reinterpret_cast<void*>(stream),
                                        assume_finite);
        });
      },
      py::arg("param"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("grads"), py::arg("n"),
      py::arg("out"), py::arg("workspace"), py::arg("step"), py::arg("lr"), py::arg("beta1"),
      py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("decoupled"),
      py::arg("device"), py::arg("stream"), py::arg("assume_finite"), py::arg("param_out") = 0,
      py::arg("bf16_grads") = false, py::call_guard<py::gil_scoped_release>());
  m.def(
      "cuda_copy_absmax",
      [](uintptr_t dst, uintptr_t src, size_t n, int device, uintptr_t stream) {
        return pyasgd::cuda_copy_absmax(ptr(dst), ptr<const float>(src), n, device,
                                        reinterpret_cast<void*>(stream));
      },
      py::arg("dst"), py::arg("src"), py::arg("n"), py::arg("device"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>(),
      "Copies n floats from device memory to mapped pinned memory; returns max |x| (+inf: not finite).");
  m.def(
      "cuda_copy_bf16_absmax",
      [](uintptr_t dst, uintptr_t src, size_t n, int device, uintptr_t stream) {
        return pyasgd::cuda_copy_bf16_absmax(ptr<uint16_t>(dst), ptr<const float>(src), n, device,
                                             reinterpret_cast<void*>(stream));
      },
      py::arg("dst"), py::arg("src"), py::arg("n"), py::arg("device"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>(),
      "Rounds n floats from device memory to bf16 (nearest even) into dst (mapped pinned memory); "
      "returns max |rounded| (+inf: not finite).");
  m.def("cuda_device_count", &pyasgd::cuda_device_count);
  m.def("cuda_host_register", [](uintptr_t p, size_t bytes) { pyasgd::cuda_host_register(ptr<void>(p), bytes); });
  m.def("cuda_host_unregister", [](uintptr_t p) { pyasgd::cuda_host_unregister(ptr<void>(p)); });
#else
  m.attr("cuda_built") = false;
  m.attr("cuda_archs") = "";
  m.attr("cuda_max_grads") = 0;
  m.def("cuda_device_count", [] { return 0; });
#endif
  m.attr("compiler") = PYASGD_COMPILER;
  m.attr("__version__") = PYASGD_VERSION;
  bind_region(m);
}
