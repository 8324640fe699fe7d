"""`dense`: exact attention over the paged cache; the oracle every other backend reduces to.

The helpers below are what other backends compose for their exact parts (a full-attention layer, a prefill
that is dense below a threshold): plans built in `prepare` for the kernel that will run them, rows of a packed
batch attended in `forward`.
A model's own sliding window is honoured: each distinct window of its layers gets a plan of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attention_backends.base import AttentionBackend, Capabilities
from attention_backends.context import AttentionSpec, BackendBatch, Phase, SeqStep
from attention_backends.kernels.decode import DecodePlan, decode_plan, paged_decode
from attention_backends.kernels.paged import row_index
from attention_backends.kernels.prefill import PrefillBatch, prefill_batch, prefill_into, prefill_plan
from attention_backends.registry import register_backend
from kv_cache.paged_kv import PagedKVCache


@dataclass(frozen=True, slots=True)
class DecodeRows:
    """Decoding sequences' rows of the batch, with one plan per window the model's layers use."""

    rows: torch.Tensor | slice  # [B] rows of the batch (`row_index`)
    plans: dict[int | None, DecodePlan]


@dataclass(frozen=True, slots=True)
class DenseMeta:
    prefill: dict[int | None, PrefillBatch]  # every prefill chunk, exact, per window the model's layers use
    decode: DecodeRows | None


def exact_prefill(seqs: list[SeqStep], spec: AttentionSpec, kv: PagedKVCache) -> dict[int | None, PrefillBatch]:
    """Prefill chunks attended exactly (causal, within a model's own window), one batch per window."""
    group = spec.num_heads // spec.num_kv_heads
    return {w: prefill_batch([(s.query_start, s.block_table, prefill_plan(s.num_computed_tokens, s.query_len, window=w,
                                                                           dtype=kv.spec.dtype, device=kv.device))
                              for s in seqs], group, kv.device, kv.num_blocks)
            for w in set(spec.layer_windows)}


def exact_decode(seqs: list[SeqStep], spec: AttentionSpec, kv: PagedKVCache) -> DecodeRows | None:
    if not seqs:
        return None
    tables, lens = [s.block_table for s in seqs], [s.context_len for s in seqs]
    return DecodeRows(row_index([s.query_start for s in seqs]),
                      {w: decode_plan(tables, lens, spec.block_size, windows=None if w is None else [w] * len(seqs),
                                      device=kv.device, num_blocks=kv.num_blocks)
                       for w in set(spec.layer_windows)})


def dense_meta(seqs: list[SeqStep], spec: AttentionSpec, kv: PagedKVCache) -> DenseMeta:
    return DenseMeta(exact_prefill([s for s in seqs if s.phase is Phase.PREFILL], spec, kv),
                     exact_decode([s for s in seqs if s.phase is Phase.DECODE], spec, kv))


def attend_decode(out: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  rows: torch.Tensor | slice, plan: DecodePlan, scale: float) -> None:
    """Decoding rows of `out`, one query each."""
    out[:, rows] = paged_decode(q[:, rows].transpose(0, 1), k_cache, v_cache, plan, scale).transpose(0, 1)


def attend_exact(out: torch.Tensor, meta: DenseMeta, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 k_cache: torch.Tensor, v_cache: torch.Tensor, window: int | None, scale: float) -> None:
    prefill_into(out, q, k, v, k_cache, v_cache, meta.prefill[window], scale)
    if meta.decode is not None:
        attend_decode(out, q, k_cache, v_cache, meta.decode.rows, meta.decode.plans[window], scale)


@register_backend
class DenseBackend(AttentionBackend[DenseMeta]):
    name = "dense"
    capabilities = Capabilities(exact=True)

    def prepare(self, batch: BackendBatch[DenseMeta]) -> DenseMeta:
        return dense_meta(batch.seqs, self.spec, self.kv)

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: BackendBatch[DenseMeta],
                scale: float) -> torch.Tensor:
        self.store_kv(layer, k, v, batch.slot_mapping)
        out = torch.empty_like(q)
        attend_exact(out, batch.meta, q, k, v, self.kv.k[layer], self.kv.v[layer], self.spec.layer_windows[layer],
                     scale)
        return out
