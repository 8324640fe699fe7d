// The Python module of longserve's CPU kernels (loaded by cpu_ext.py).

#include <torch/extension.h>

#include "cpu_kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear_rows", &longserve::linear_rows, "a linear layer over a few rows, at the speed its weight streams");
  m.attr("max_linear_rows") = longserve::kMaxLinearRows;
  m.def("rms_norm", &longserve::rms_norm, "RMSNorm over rows, after adding a residual if one is given",
        py::arg("x"), py::arg("weight"), py::arg("eps"), py::arg("residual") = py::none());
  m.def("silu_and_mul", &longserve::silu_and_mul, "silu(gate) * up from rows of gate values followed by up values");
  m.def("rotary_inplace", &longserve::rotary_inplace, "rotary position embedding on queries and keys, in place");
  m.def("write_slots", &longserve::write_slots, "store fresh rows at their cache slots");
  m.def("paged_decode", &longserve::paged_decode, "paged decode over sinks and a band, read in place");
  m.def("paged_prefill", &longserve::paged_prefill,
        "a chunk's queries over the keys each sees (sinks, a band, causal), read in place, into out");
  m.def("lowrank_topk_decode", &longserve::lowrank_topk_decode,
        "decode over each key set's top keys by low-rank scores, read in place");
}
