"""A float32 model served on the CPU, with fewer and larger calls per layer: the same arithmetic as its HF modules.

Each decode step runs every module of every layer for a handful of rows, so the number of calls, and the Python
around them, is a good part of a step's time: HF's RMSNorm is eight torch ops (torch's own CPU `rms_norm` seven),
its attention three products and a dozen ops of RoPE, its MLP two products and two element-wise ops where one of
each would do, and its decoder layer's wrappers (argument deprecation, gradient checkpointing) run at every call.
Here a norm is one kernel call (the residual add before it included), queries, keys and values one product over
their stacked weights, RoPE one in-place kernel call, the MLP's gate and up products one product over their stacked
weights and `silu(gate) * up` one kernel call over its rows (torch's two ops took ~6 ms a layer on a 2,048-token
prefill chunk), and a Llama-family decoder layer a plain forward over these. Results equal the HF modules' to
float32 rounding (the kernels sum in another order). A decode step at 1k takes 6-11 ms (10-15%) less than with HF's
modules; a prefill 6-9% less at 1k-2k (`benchmarks/bench_cpu_modules.py`, BENCHMARKS.md)."""

from __future__ import annotations

from typing import Any

import torch
from transformers.activations import SiLUActivation

from attention_backends.hf_attention import ATTN_IMPLEMENTATION, longserve_attention
from attention_backends.kernels import cpu_ext
from engine.cpu_linear import CpuLinear, cpu_kernels_apply, use_cpu_linears

# The decoder layers whose forward `CpuDecoderLayer` reproduces, and their attention modules.
_LLAMA_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")
_LLAMA_ATTENTION = ("LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention")


class CpuRMSNorm(torch.nn.Module):
    """HF's RMSNorm of the Llama family (`weight * x / sqrt(mean(x^2) + eps)`) as one kernel call, optionally with
    the residual add before it."""

    def __init__(self, norm: torch.nn.Module) -> None:
        super().__init__()
        self.weight = norm.weight
        self.eps = float(norm.variance_epsilon)
        self._kernel = cpu_ext.load().rms_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._kernel(x.contiguous(), self.weight, self.eps)[1]

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(residual + x, norm(residual + x))`."""
        return self._kernel(x.contiguous(), self.weight, self.eps, residual.contiguous())


def _stacked(*linears: torch.nn.Module) -> CpuLinear:
    """One `CpuLinear` whose output is the linears' outputs side by side: one pass over their weights."""
    first = linears[0]
    out = sum(lin.out_features for lin in linears)
    # Built on the meta device, then given the stacked weights: no initialisation of a weight that is replaced.
    both = torch.nn.Linear(first.in_features, out, bias=first.bias is not None, device="meta")
    both.weight = torch.nn.Parameter(torch.cat([lin.weight for lin in linears]).detach(), requires_grad=False)
    if first.bias is not None:
        both.bias = torch.nn.Parameter(torch.cat([lin.bias for lin in linears]).detach(), requires_grad=False)
    return CpuLinear(both)


class GateUpMLP(torch.nn.Module):
    """A SiLU-gated MLP, `down(silu(gate(x)) * up(x))`: the gate and up products as one, and `silu(gate) * up` one
    kernel call over its rows."""

    def __init__(self, mlp: torch.nn.Module) -> None:
        super().__init__()
        self.gate_up_proj = _stacked(mlp.gate_proj, mlp.up_proj)
        self.down_proj = mlp.down_proj
        self._silu_and_mul = cpu_ext.load().silu_and_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self._silu_and_mul(self.gate_up_proj(x)))


class CpuSelfAttention(torch.nn.Module):
    """A Llama-family self-attention (Llama, Mistral, Qwen2, Qwen3) for longserve's packed batches: queries, keys
    and values from one product over their stacked weights, RoPE applied in place to that product's rows by one
    kernel call, and longserve's attention function called directly (its sliding windows come from the attention
    spec, not from the layer's arguments)."""

    def __init__(self, attn: torch.nn.Module) -> None:
        super().__init__()
        self.layer_idx, self.scaling, self.head_dim = attn.layer_idx, attn.scaling, attn.head_dim
        self.split = tuple(p.out_features // self.head_dim for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        self.qkv_proj = _stacked(attn.q_proj, attn.k_proj, attn.v_proj)
        self.o_proj = attn.o_proj
        self.q_norm, self.k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)  # Qwen3's
        self._rotary = cpu_ext.load().rotary_inplace

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                **kwargs: Any) -> torch.Tensor:
        lead = hidden_states.shape[:-1]  # [1, T]
        qkv = self.qkv_proj(hidden_states).view(*lead, -1, self.head_dim)
        q, k, v = qkv.split(self.split, dim=-2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = position_embeddings
        self._rotary(q[0], k[0], cos[0], sin[0])
        out, _ = longserve_attention(self, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None,
                                     scaling=self.scaling)
        return self.o_proj(out.reshape(*lead, -1))


class CpuDecoderLayer(torch.nn.Module):
    """A pre-norm decoder layer of the Llama family, `h = x + attn(norm(x)); h + mlp(norm(h))`, without HF's
    per-call wrappers (argument deprecation, gradient checkpointing): a decode step runs it for a handful of rows."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = layer.input_layernorm, layer.post_attention_layernorm
        self.self_attn = CpuSelfAttention(layer.self_attn)
        self.mlp = layer.mlp

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                **kwargs: Any) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(hidden_states), position_embeddings)
        h, normed = self.post_attention_layernorm.add_and_norm(attn, hidden_states)
        return h + self.mlp(normed)


def _is_llama_norm(module: torch.nn.Module) -> bool:
    # The supported architectures' norms (Llama, Mistral, Qwen2, Qwen3) share this class shape and formula.
    return type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")


def _is_gated_mlp(module: torch.nn.Module) -> bool:
    return (all(type(getattr(module, name, None)) is torch.nn.Linear for name in ("gate_proj", "up_proj", "down_proj"))
            and isinstance(getattr(module, "act_fn", None), (SiLUActivation, torch.nn.SiLU)))


def _is_llama_layer(module: torch.nn.Module) -> bool:
    return (type(module).__name__ in _LLAMA_LAYERS and type(module.self_attn).__name__ in _LLAMA_ATTENTION
            and all(isinstance(n, CpuRMSNorm) for n in (module.input_layernorm, module.post_attention_layernorm)))


def use_cpu_modules(model: torch.nn.Module) -> int:
    """Replaces, in a float32 model on the CPU (where longserve's C++ kernels build), each Llama-family RMSNorm by
    `CpuRMSNorm`, each SiLU-gated MLP by `GateUpMLP` and every remaining `nn.Linear` by `CpuLinear`; in a model
    run through longserve's attention function, each Llama-family decoder layer by `CpuDecoderLayer` too. Returns
    how many modules were replaced."""
    if not cpu_kernels_apply(model):
        return 0
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if _is_llama_norm(child) or _is_gated_mlp(child)]
    for parent, name, child in targets:
        setattr(parent, name, CpuRMSNorm(child) if _is_llama_norm(child) else GateUpMLP(child))
    layers = []
    if getattr(getattr(model, "config", None), "_attn_implementation", None) == ATTN_IMPLEMENTATION:
        layers = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
                  if _is_llama_layer(child)]
    for parent, name, child in layers:
        setattr(parent, name, CpuDecoderLayer(child))
    return len(targets) + len(layers) + use_cpu_linears(model)

