// Python bindings of the shared region (pyasgd._C.Region); pyasgd/exchange.py wraps them with
// tensor views and argument checks. Blocking calls release the GIL.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <memory>

#include "region.h"

namespace py = pybind11;
using pyasgd::Region;

namespace {
// The object behind Region.memory(): it exports the mapping through the buffer protocol and
// holds a reference to it, so every memoryview and tensor made from it (torch.frombuffer keeps
// its buffer object) keeps the segment mapped after the Region itself is gone.
struct RegionMemory {
  std::shared_ptr<pyasgd::Mapping> map;
};
}  // namespace

void bind_region(py::module_& m) {
  py::register_exception<pyasgd::TimeoutError>(m, "RegionTimeoutError", PyExc_TimeoutError);
  py::register_exception<pyasgd::ClosedError>(m, "RegionClosedError", PyExc_RuntimeError);
  py::register_exception<pyasgd::SpaceError>(m, "RegionSpaceError", PyExc_OSError);
  m.attr("GRAD_F32") = static_cast<uint32_t>(pyasgd::kGradF32);
  m.attr("GRAD_BF16") = static_cast<uint32_t>(pyasgd::kGradBF16);
  using nogil = py::call_guard<py::gil_scoped_release>;

  py::class_<pyasgd::Collected>(m, "Collected")
      .def_readonly("slot", &pyasgd::Collected::slot)
      .def_readonly("worker", &pyasgd::Collected::worker)
      .def_readonly("version", &pyasgd::Collected::version)
      .def_readonly("tokens", &pyasgd::Collected::tokens)
      .def_readonly("push_seq", &pyasgd::Collected::push_seq)
      .def_readonly("loss", &pyasgd::Collected::loss)
      .def_readonly("position", &pyasgd::Collected::position)
      .def_readonly("bound", &pyasgd::Collected::bound);
  py::class_<pyasgd::Reclaimed>(m, "Reclaimed")
      .def_readonly("slot", &pyasgd::Reclaimed::slot)
      .def_readonly("pid", &pyasgd::Reclaimed::pid)
      .def_readonly("worker", &pyasgd::Reclaimed::worker);

  py::class_<RegionMemory>(m, "_RegionMemory", py::buffer_protocol())
      .def_buffer([](RegionMemory& mem) {
        return py::buffer_info(mem.map->base, 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(mem.map->size)}, {1});
      });

  py::class_<pyasgd::Ticket>(m, "Ticket")
      .def(py::init<>())
      .def_readonly("push_seq", &pyasgd::Ticket::push_seq)
      .def_readonly("slot", &pyasgd::Ticket::slot)
      .def_readonly("acks", &pyasgd::Ticket::acks);

  py::class_<Region>(m, "Region")
      .def_static("create", &Region::create, py::arg("n"), py::arg("slots"),
                  py::arg("grad_dtype") = static_cast<uint32_t>(pyasgd::kGradF32))
      .def_static("attach", &Region::attach, py::arg("name"))
      .def_static("sweep_stale", &Region::sweep_stale)
      .def_property_readonly("name", &Region::name)
      .def_property_readonly("path", &Region::path)
      .def_property_readonly("n", &Region::n)
      .def_property_readonly("slots", &Region::slots)
      .def_property_readonly("grad_dtype", &Region::grad_dtype)  // 0: fp32, 1: bf16 slots
      .def_property_readonly("is_owner", &Region::is_owner)
      .def_property_readonly("version", &Region::version)
      .def_property_readonly("reclaimed", &Region::reclaimed)
      .def_property_readonly("closed", &Region::closed)
      .def_property_readonly("address", [](const Region& r) { return reinterpret_cast<uintptr_t>(r.base()); })
      .def_property_readonly("size", &Region::size)
      .def("memory", [](const Region& r) { return py::memoryview(py::cast(RegionMemory{r.mapping()})); })
      .def("param_offset", &Region::param_offset)
      .def("slot_offset", &Region::slot_offset)
      .def("slot_state", &Region::slot_state)
      .def("close", &Region::close)
      .def("unlink", &Region::unlink)
      .def("front_index", &Region::front_index)
      .def("begin_write", &Region::begin_write)
      .def("end_write", &Region::end_write, py::arg("publish"))
      .def("read_begin", [](const Region& r) {
        uint64_t v, s;
        int i;
        {
          py::gil_scoped_release released;  // not around make_tuple: that needs the GIL
          r.read_begin(&v, &i, &s);
        }
        return py::make_tuple(v, i, s);
      })
      .def("read_validate", &Region::read_validate)
      .def("pull_cpu", [](const Region& r, uintptr_t dst) { return r.pull_cpu(reinterpret_cast<float*>(dst)); }, nogil())
      .def("wait_version", &Region::wait_version, nogil())
      .def("claim", &Region::claim, nogil())
      .def("commit", &Region::commit, py::arg("slot"), py::arg("version"), py::arg("tokens"), py::arg("loss"),
           py::arg("bound"), py::arg("position") = 0, nogil())
      .def("abandon", &Region::abandon)
      .def("push_cpu", [](Region& r, uintptr_t src, int worker, uint64_t version, uint64_t tokens, double loss,
                          uint64_t position, double timeout) {
        return r.push_cpu(reinterpret_cast<const float*>(src), worker, version, tokens, loss, position, timeout);
      }, nogil())
      .def("collect", [](Region& r, int G, double timeout) {
        std::vector<pyasgd::Reclaimed> rec;
        auto got = r.collect(G, timeout, &rec);
        return std::make_pair(got, rec);
      }, nogil())
      .def("release", &Region::release, nogil())
      .def("ack", &Region::ack, nogil())
      .def("wait_ack", &Region::wait_ack, nogil())
      .def("reclaim_dead", &Region::reclaim_dead, nogil());
}
