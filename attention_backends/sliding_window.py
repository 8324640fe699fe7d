"""`sliding_window`: SWAA, sliding-window attention adaptation of a full-attention model (no training).

In a windowed layer, key j is visible to query i iff j <= i and (i - j < window or j < sinks). Recipes
combine: windowed prefill with full-attention decode (`prefill_only`, the paper's "FA decode"), sink
tokens, and full-attention layers interleaved (`full_attention_layers`). Prefill computes only the band
each query tile needs (its sink blocks and the blocks inside its window), never a full score matrix.
With windowed decode as well and no full-attention layer, `release_kv` hands blocks behind the window
back to the pool, so a sequence holds O(sinks + window) KV however long it runs.
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from attention_backends.base import Capabilities
from attention_backends.context import BackendBatch, SeqStep
from attention_backends.dense import DecodeRows, DenseBackend
from attention_backends.kernels.window import band_plan, band_prefill_attention, window_block_tables
from attention_backends.registry import register_backend

_EVERY = re.compile(r"every:([1-9]\d*)")


class SlidingWindowParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    window: int = Field(2048, ge=1, description="keys visible to a query, itself included")
    sinks: int = Field(100, ge=0, description="first tokens every query sees")
    prefill_only: bool = Field(True, description="windowed prefill, full-attention decode (FA decode)")
    full_attention_layers: list[int] | Literal["odd", "even"] | str | None = Field(
        None, description='layers that keep full attention: a list, "odd", "even", "every:K" (1, 1+K, ...)')
    release_kv: bool = Field(False, description="free blocks behind the window (needs windowed decode)")

    @model_validator(mode="after")
    def _check(self) -> SlidingWindowParams:
        fa = self.full_attention_layers
        if isinstance(fa, str) and fa not in ("odd", "even") and not _EVERY.fullmatch(fa):
            raise ValueError(f'full_attention_layers must be a list, "odd", "even" or "every:K", got {fa!r}')
        if isinstance(fa, list) and any(i < 0 for i in fa):
            raise ValueError("full_attention_layers must hold layer indices >= 0")
        if self.release_kv and (self.prefill_only or fa):
            raise ValueError("release_kv needs windowed decode (prefill_only false) and no full-attention layers: "
                             "full attention reads every block")
        return self

    def full_layers(self, num_layers: int) -> frozenset[int]:
        fa = self.full_attention_layers
        if fa is None:
            return frozenset()
        if isinstance(fa, list):
            if any(i >= num_layers for i in fa):
                raise ValueError(f"full_attention_layers {fa} names layers past the model's {num_layers}")
            return frozenset(fa)
        step = {"odd": 2, "even": 2}.get(fa) or int(_EVERY.fullmatch(fa).group(1))
        offset = 0 if fa == "even" else 1 % step
        return frozenset(i for i in range(num_layers) if i % step == offset)


@register_backend
class SlidingWindowBackend(DenseBackend):
    """Dense where a layer keeps full attention; the band elsewhere."""

    name = "sliding_window"
    Params = SlidingWindowParams
    capabilities = Capabilities(exact=False, releases_blocks=True)

    def _windowed_layers(self, params: SlidingWindowParams) -> frozenset[int]:
        # A layer with its own window in the model's config keeps it (and no sinks): it was trained so.
        full = params.full_layers(self.spec.num_layers)
        return frozenset(i for i, own in enumerate(self.spec.layer_windows) if own is None and i not in full)

    def prepare(self, batch: BackendBatch) -> None:
        super().prepare(batch)
        dtype, device = self.kv.spec.dtype, self.kv.device
        batch.meta["plans"] = [(band_plan(s, s.params.window, s.params.sinks, dtype, device),
                                self._windowed_layers(s.params)) for s in batch.meta["prefill"]]
        windowed = [frozenset() if s.params.prefill_only else self._windowed_layers(s.params)
                    for s in batch.meta["decodes"]]
        batch.meta["window_decode"] = None
        if any(windowed):
            tables, valid = window_block_tables(batch.meta["decodes"], self.spec.block_size)
            rows = batch.meta["decode"]
            batch.meta["window_decode"] = (DecodeRows(rows.index, tables, valid, rows.lens), windowed)

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: BackendBatch,
                scale: float) -> torch.Tensor:
        self.store_kv(layer, k, v, batch)
        out = torch.empty_like(q)
        for seq, (plan, windowed) in zip(batch.meta["prefill"], batch.meta["plans"]):
            if layer not in windowed:
                self.prefill(layer, q, k, v, seq, scale, out)
                continue
            s, e = seq.query_start, seq.query_start + seq.query_len
            out[:, s:e] = band_prefill_attention(self.kv, layer, q[:, s:e], k[:, s:e], v[:, s:e], seq, plan, scale)
        if batch.meta["window_decode"] is not None:
            window_rows, windowed = batch.meta["window_decode"]
            banded = [i for i, w in enumerate(windowed) if layer in w]
            full = [i for i, w in enumerate(windowed) if layer not in w]
            if full:
                self.decode(layer, q, batch.meta["decode"].take(full), scale, out)
            if banded:
                self.decode(layer, q, window_rows.take(banded), scale, out)
        elif batch.meta["decode"] is not None:  # full-attention decode for every sequence in this step
            self.decode(layer, q, batch.meta["decode"], scale, out)
        return out

    def check(self, params: SlidingWindowParams) -> None:
        params.full_layers(self.spec.num_layers)

    def blocks_to_release(self, seq: SeqStep) -> list[int]:
        p = seq.params
        if not p.release_kv:
            return []
        bs = self.spec.block_size
        # Called after the step: num_cached = L tokens are in the cache. The next query sits at position L and
        # sees keys > L - window, so blocks past the sinks and wholly before that are never read again.
        first = -(-p.sinks // bs)
        last = (seq.num_cached - p.window + 1) // bs
        return list(range(first, last))
