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
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from attention_backends.base import AttentionBackend, Capabilities
from attention_backends.context import BackendBatch, Phase, SeqStep
from attention_backends.dense import (
    DecodeRows,
    Windows,
    attend_decode,
    attend_prefill,
    exact_decode_rows,
    exact_prefill_plans,
)
from attention_backends.kernels.decode import DecodePlan, decode_plan
from attention_backends.kernels.paged import cdiv
from attention_backends.kernels.prefill import PrefillPlan, prefill_plan
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
class BandPrefill:
    """One prefill chunk: its band plan for the windowed layers, its exact plans for the others."""

    seq: SeqStep
    band: PrefillPlan
    exact: Windows  # empty when every layer is windowed
    windowed: frozenset[int]


@dataclass(frozen=True, slots=True)
class WindowPlan:
    prefills: list[BandPrefill]
    decode: DecodeRows | None  # every decoding row, exact (full-attention layers, FA decode)
    band_decode: DecodePlan | None  # every decoding row, windowed; None when no row is windowed in any layer
    decode_windowed: list[frozenset[int]]  # per decoding row: its windowed layers


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
        dtype, device, layers = self.kv.spec.dtype, self.kv.device, self.spec.num_layers
        prefills = []
        for s in batch.seqs:
            if s.phase is Phase.PREFILL:
                windowed, p = self._windowed_layers(s.params), s.params
                band = prefill_plan(s.num_computed_tokens, s.query_len, sinks=p.sinks, window=p.window, dtype=dtype,
                                    device=device)
                exact = exact_prefill_plans(s, self.spec, dtype, device) if len(windowed) < layers else {}
                prefills.append(BandPrefill(s, band, exact, windowed))
        decodes = [s for s in batch.seqs if s.phase is Phase.DECODE]
        windowed = [frozenset() if s.params.prefill_only else self._windowed_layers(s.params) for s in decodes]
        band_decode = None
        if any(windowed):
            band_decode = decode_plan([s.block_table for s in decodes], [s.context_len for s in decodes],
                                      self.spec.block_size, [s.params.sinks for s in decodes],
                                      [s.params.window for s in decodes])
        return WindowPlan(prefills, exact_decode_rows(decodes, self.spec), band_decode, windowed)

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: BackendBatch[WindowPlan],
                scale: float) -> torch.Tensor:
        self.store_kv(layer, k, v, batch.slot_mapping)
        meta, kc, vc, own = batch.meta, self.kv.k[layer], self.kv.v[layer], self.spec.layer_windows[layer]
        out = torch.empty_like(q)
        for p in meta.prefills:
            attend_prefill(out, q, k, v, kc, vc, p.seq, p.band if layer in p.windowed else p.exact[own], scale)
        if meta.decode is not None:
            banded = [i for i, w in enumerate(meta.decode_windowed) if layer in w]
            full = [i for i, w in enumerate(meta.decode_windowed) if layer not in w]
            if not banded:
                attend_decode(out, q, kc, vc, meta.decode.rows, meta.decode.plans[own], scale)
            else:
                if full:
                    attend_decode(out, q, kc, vc, meta.decode.rows[full], meta.decode.plans[own].take(full), scale)
                attend_decode(out, q, kc, vc, meta.decode.rows[banded], meta.band_decode.take(banded), scale)
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
