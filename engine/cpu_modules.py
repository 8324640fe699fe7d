"""A float32 model served on the CPU, with fewer and larger calls per layer: the same arithmetic as its HF modules.

Each decode step runs every module of every layer for a handful of rows, so the number of calls is a good part of
a step's time: HF's RMSNorm is eight torch ops, and its MLP runs the gate and up products apart. Here a norm is
one `F.rms_norm` call (the same float32 operations, in the same order: bitwise equal to the HF module), and an MLP's
gate and up products one pass over their stacked weights for a decode step's few rows (a prefill chunk's many rows
run the two halves apart: the element-wise ops are faster on contiguous outputs). Against the HF modules (with
`CpuLinear` products in both), a decode step at 1k takes 1-2 ms (~3%) less, a 1k prefill the same (BENCHMARKS.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.activations import SiLUActivation

from engine.cpu_linear import CpuLinear, cpu_kernels_apply, use_cpu_linears


class CpuRMSNorm(torch.nn.Module):
    """HF's RMSNorm of the Llama family (`weight * x / sqrt(mean(x^2) + eps)`) as one call."""

    def __init__(self, norm: torch.nn.Module) -> None:
        super().__init__()
        self.weight = norm.weight
        self.eps = float(norm.variance_epsilon)
        self.shape = (norm.weight.shape[-1],)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.shape, self.weight, self.eps)


class GateUpMLP(torch.nn.Module):
    """A SiLU-gated MLP, `down(silu(gate(x)) * up(x))`, with the gate and up products as one."""

    def __init__(self, mlp: torch.nn.Module) -> None:
        super().__init__()
        gate, up = mlp.gate_proj, mlp.up_proj
        self.intermediate = gate.out_features
        # Built on the meta device, then given the stacked weights: no initialisation of a weight that is replaced.
        both = torch.nn.Linear(gate.in_features, 2 * self.intermediate, bias=gate.bias is not None, device="meta")
        both.weight = torch.nn.Parameter(torch.cat([gate.weight, up.weight]).detach(), requires_grad=False)
        if gate.bias is not None:
            both.bias = torch.nn.Parameter(torch.cat([gate.bias, up.bias]).detach(), requires_grad=False)
        self.gate_up_proj = CpuLinear(both)
        self.down_proj = mlp.down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.intermediate
        if x.numel() // self.gate_up_proj.in_features <= self.gate_up_proj.max_rows:  # one pass over both weights
            gate_up = self.gate_up_proj(x)
            gate, up = gate_up[..., :n], gate_up[..., n:]
        else:  # many rows: two products into contiguous outputs (the element-wise ops run faster on them)
            w, b = self.gate_up_proj.weight, self.gate_up_proj.bias
            gate = F.linear(x, w[:n], None if b is None else b[:n])
            up = F.linear(x, w[n:], None if b is None else b[n:])
        return self.down_proj(F.silu(gate) * up)


def _is_llama_norm(module: torch.nn.Module) -> bool:
    # The supported architectures' norms (Llama, Mistral, Qwen2, Qwen3) share this class shape and formula.
    return type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")


def _is_gated_mlp(module: torch.nn.Module) -> bool:
    return (all(type(getattr(module, name, None)) is torch.nn.Linear for name in ("gate_proj", "up_proj", "down_proj"))
            and isinstance(getattr(module, "act_fn", None), (SiLUActivation, torch.nn.SiLU)))


def use_cpu_modules(model: torch.nn.Module) -> int:
    """Replaces, in a float32 model on the CPU (where longserve's C++ kernels build), each Llama-family RMSNorm by
    `CpuRMSNorm`, each SiLU-gated MLP by `GateUpMLP` and every remaining `nn.Linear` by `CpuLinear`; returns how
    many modules were replaced."""
    if not cpu_kernels_apply(model):
        return 0
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if _is_llama_norm(child) or _is_gated_mlp(child)]
    for parent, name, child in targets:
        setattr(parent, name, CpuRMSNorm(child) if _is_llama_norm(child) else GateUpMLP(child))
    return len(targets) + use_cpu_linears(model)

