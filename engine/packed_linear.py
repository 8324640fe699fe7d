"""Linear layers in oneDNN's packed weight layout, for models served on the CPU.

torch's default CPU path for `F.linear` is a BLAS call on the `[out, in]` weight as stored. oneDNN (which torch
ships, and which vLLM-CPU uses) reorders a weight once into the blocked layout its kernels read, so every product
skips that work: on the embedded model's shapes, prefill's large products take ~0.8x the time, and decode's
one-row products ~0.7x (the tied `lm_head`, 49,152 x 576, 11 ms -> 5 ms per step for one row, 20 ms -> 5 ms for
eight). Same float32 (or bf16) arithmetic: the results differ from the BLAS ones by summation order only.
"""

from __future__ import annotations

import torch


class PackedLinear(torch.nn.Module):
    """`nn.Linear` for inference with its weight in oneDNN's layout (no autograd: the engine never trains)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # A copy in oneDNN's layout; the original is freed with the module unless something else (a tied embedding)
        # holds it.
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().contiguous())
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def can_pack(model: torch.nn.Module) -> bool:
    """oneDNN is in torch's CPU builds for x86 and Arm; a build without it (or a CPU without bf16 instructions, for
    a bf16 model) keeps `nn.Linear`."""
    weight = next(model.parameters())
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return weight.dtype == torch.float32 or (weight.dtype == torch.bfloat16
                                             and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pack_linear_layers(model: torch.nn.Module) -> int:
    """Replaces every `nn.Linear` of a CPU model by a `PackedLinear`; returns how many were replaced."""
    if not can_pack(model):
        return 0
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is torch.nn.Linear]
    for parent, name, child in targets:
        setattr(parent, name, PackedLinear(child))
    return len(targets)
