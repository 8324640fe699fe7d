"""`sliding_window`: SWAA, sliding-window attention adaptation of a full-attention model (no training).

In a windowed layer, key j is visible to query i iff j <= i and (i - j < window or j < sinks). Recipes
combine: windowed prefill with full-attention decode (`prefill_only`, the paper's "FA decode"), sink
tokens, and full-attention layers interleaved (`full_attention_layers`). Prefill computes only the band
each query tile needs (its sink blocks and the blocks inside its window), never a full score matrix.
With windowed decode as well and no full-attention layer, `release_kv` hands blocks behind the window
back to the pool, so a sequence holds O(sinks + window) KV however long it runs.

The dense floor is the window itself: a sequence no longer than `window` sees every earlier key in every
layer, which is exactly `dense`, and nothing is released.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from attention_backends.base import AttentionBackend, Capabilities
from attention_backends.context import BackendBatch, Phase, SeqStep
from attention_backends.kernels.paged import cdiv
from attention_backends.kernels.ranges import RangeRow, RangeWork, attend_ranges, range_work
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


@dataclass(frozen=True, slots=True)
class WindowPlan:
    layers: list[RangeWork]  # per layer; layers that window the same sequences share one


@register_backend
class SlidingWindowBackend(AttentionBackend[WindowPlan]):
    """Exact where a layer keeps full attention; the band elsewhere."""

    name = "sliding_window"
    Params = SlidingWindowParams
    capabilities = Capabilities(exact=False)

    def _windowed_layers(self, params: SlidingWindowParams) -> frozenset[int]:
        # A layer with its own window in the model's config keeps it (and no sinks): it was trained so.
        full = params.full_layers(self.spec.num_layers)
        return frozenset(i for i, own in enumerate(self.spec.layer_windows) if own is None and i not in full)

    def prepare(self, batch: BackendBatch[WindowPlan]) -> WindowPlan:
        spec = self.spec
        # A prefill chunk is windowed in its windowed layers; a decode only without FA decode (`prefill_only`).
        windowed = [self._windowed_layers(s.params) if s.phase is Phase.PREFILL or not s.params.prefill_only
                    else frozenset() for s in batch.seqs]
        work: dict[tuple, RangeWork] = {}
        layers = []
        for layer, own in enumerate(spec.layer_windows):
            banded = tuple(layer in w for w in windowed)
            if (banded, own) not in work:
                work[banded, own] = self._layer_work(batch.seqs, banded, own)
            layers.append(work[banded, own])
        return WindowPlan(layers)

    def _layer_work(self, seqs: list[SeqStep], banded: tuple[bool, ...], own: int | None) -> RangeWork:
        rows = [RangeRow(s.query_start, s.block_table, s.num_computed_tokens, s.query_len,
                         *((s.params.sinks, s.params.window) if band else (0, own)))
                for s, band in zip(seqs, banded)]
        spec, kv = self.spec, self.kv
        return range_work(rows, block_size=spec.block_size, group=spec.num_heads // spec.num_kv_heads,
                          dtype=kv.spec.dtype, device=kv.device, num_blocks=kv.num_blocks)

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: BackendBatch[WindowPlan],
                scale: float) -> torch.Tensor:
        self.store_kv(layer, k, v, batch.slot_mapping)
        out = torch.empty_like(q)
        attend_ranges(out, q, k, v, self.kv.k[layer], self.kv.v[layer], batch.meta.layers[layer], scale)
        return out

    def check(self, params: SlidingWindowParams) -> None:
        params.full_layers(self.spec.num_layers)

    def blocks_to_release(self, step: SeqStep[SlidingWindowParams, None]) -> list[int]:
        p = step.params
        if not p.release_kv:
            return []
        bs = self.spec.block_size
        # The cache holds L = step.end tokens. The next query sits at position L and sees keys > L - window, so
        # blocks past the sinks and wholly before that are never read again.
        return list(range(cdiv(p.sinks, bs), (step.end - p.window + 1) // bs))
