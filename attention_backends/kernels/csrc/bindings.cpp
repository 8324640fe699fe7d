// The Python module of longserve's CPU kernels (loaded by cpu_ext.py).

#include <torch/extension.h>

#include "cpu_kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear_rows", &longserve::linear_rows, "a linear layer over a few rows, at the speed its weight streams");
  m.attr("max_linear_rows") = longserve::kMaxLinearRows;
  m.attr("vector_lanes") = longserve::kLanes;  // floats in a vector of the instruction set it was built for
  m.def("rms_norm", &longserve::rms_norm, "RMSNorm over rows, after adding a residual if one is given",
        py::arg("x"), py::arg("weight"), py::arg("eps"), py::arg("residual") = py::none());
  m.def("silu_and_mul", &longserve::silu_and_mul, "silu(gate) * up from rows of gate values followed by up values");
  m.def("rotary_inplace", &longserve::rotary_inplace, "rotary position embedding on queries and keys, in place");
  m.def("write_slots", &longserve::write_slots, "store fresh rows at their cache slots");
  m.def("write_kv", &longserve::write_kv, "store fresh keys, rotated per head if a rotation is given, and values",
        py::arg("k_cache"), py::arg("v_cache"), py::arg("k"), py::arg("v"), py::arg("slot_mapping"),
        py::arg("key_rotation") = py::none());
  m.def("paged_decode", &longserve::paged_decode,
        "paged decode over sinks and a band, read in place, through a block table per row or per row and KV head",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("tables"), py::arg("ranges"), py::arg("scale"),
        py::arg("keep") = py::none());
  m.def("paged_prefill", &longserve::paged_prefill,
        "a chunk's queries over the keys each sees (sinks, a band, causal), read in place, into out", py::arg("out"),
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("table"), py::arg("start"), py::arg("sinks"),
        py::arg("lo"), py::arg("window"), py::arg("scale"), py::arg("keep") = py::none());
  m.def("lowrank_topk_decode", &longserve::lowrank_topk_decode,
        "decode over each key set's top keys by low-rank scores, read in place", py::arg("q"), py::arg("low"),
        py::arg("k_cache"), py::arg("v_cache"), py::arg("tables"), py::arg("limits"), py::arg("sets"),
        py::arg("scale"), py::arg("query_rotation") = py::none(), py::arg("out") = py::none());
  m.def("select_decode_pages", &longserve::select_decode_pages,
        "InfLLM-V2's block selection for one query per row: the pages each KV head attends to", py::arg("q"),
        py::arg("means"), py::arg("tables"), py::arg("positions"), py::arg("page"), py::arg("block"),
        py::arg("kernel"), py::arg("stride"), py::arg("init_blocks"), py::arg("local_blocks"), py::arg("k"),
        py::arg("scale"));
}
