"""The attention function registered with transformers: HF layers call it, it hands the work to the backends.

transformers builds no mask for a name it does not know, so this function owns causality and sequence
boundaries in the packed `[1, T]` batch; it learns them from the step context set by the model runner.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import AttentionInterface

from attention_backends.context import StepContext

ATTN_IMPLEMENTATION = "longserve"
# kwargs that change the math and that no backend implements; silently ignoring them would be wrong.
_UNSUPPORTED = ("s_aux", "softcap")

# Per thread: engines in different threads (a server's loop thread, a test or benchmark beside it) may
# run the same model at once.
_local = threading.local()


@contextmanager
def step_context(ctx: StepContext) -> Iterator[None]:
    _local.ctx = ctx
    try:
        yield
    finally:
        _local.ctx = None


@contextmanager
def capture_qk(fn: Callable[[int, torch.Tensor, torch.Tensor], None]) -> Iterator[None]:
    """Calls `fn(layer, q, k)` with each layer's post-RoPE queries `[H_q, T, D]` and keys `[H_kv, T, D]` while
    this thread runs steps: what offline calibration learns from."""
    _local.capture = fn
    try:
        yield
    finally:
        _local.capture = None


def longserve_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                        **kwargs: Any) -> tuple[torch.Tensor, None]:
    ctx = getattr(_local, "ctx", None)
    if ctx is None:
        raise RuntimeError("longserve attention called outside an engine step")
    for name in _UNSUPPORTED:
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"attention argument {name!r} is not supported by longserve")
    if query.shape[0] != 1:
        raise ValueError("longserve runs packed batches of shape [1, T]")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    layer = module.layer_idx
    q, k, v = query[0], key[0], value[0]  # [H, T, D]
    capture = getattr(_local, "capture", None)
    if capture is not None:
        capture(layer, q, k)
    if len(ctx.batches) == 1:
        name, batch = next(iter(ctx.batches.items()))
        out = ctx.backends[name].forward(layer, q, k, v, batch, scale)
    else:
        out = torch.empty_like(q)
        for name, batch in ctx.batches.items():
            idx = batch.token_index
            out[:, idx] = ctx.backends[name].forward(layer, q[:, idx], k[:, idx], v[:, idx], batch, scale)
    return out.transpose(0, 1).unsqueeze(0), None


AttentionInterface.register(ATTN_IMPLEMENTATION, longserve_attention)
