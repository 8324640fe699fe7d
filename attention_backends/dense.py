"""`dense`: exact attention over the paged cache; the oracle every other backend reduces to.

The helpers below are what other backends compose for their exact parts (a full-attention layer, a prefill
that is dense below a threshold): plans built in `prepare`, rows of a packed batch attended in `forward`.
A model's own sliding window is honoured: each distinct window of its layers gets a plan of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attention_backends.base import AttentionBackend, Capabilities
from attention_backends.context import AttentionSpec, BackendBatch, Phase, SeqStep
from attention_backends.kernels.decode import DecodePlan, decode_plan, paged_decode
from attention_backends.kernels.prefill import PrefillPlan, paged_prefill, prefill_plan
from attention_backends.registry import register_backend

Windows = dict[int | None, PrefillPlan]  # a chunk's exact plan for each window the model's layers use


@dataclass(frozen=True, slots=True)
class DecodeRows:
    """Decoding sequences' rows of the batch, with one plan per window."""

    rows: torch.Tensor  # [B]
    plans: dict[int | None, DecodePlan]


@dataclass(frozen=True, slots=True)
class DenseMeta:
    prefills: list[tuple[SeqStep, Windows]]
    decode: DecodeRows | None


def exact_prefill_plans(seq: SeqStep, spec: AttentionSpec, dtype: torch.dtype, device: torch.device) -> Windows:
    return {w: prefill_plan(seq.num_computed_tokens, seq.query_len, window=w, dtype=dtype, device=device)
            for w in set(spec.layer_windows)}


def exact_decode_rows(seqs: list[SeqStep], spec: AttentionSpec) -> DecodeRows | None:
    if not seqs:
        return None
    tables, lens = [s.block_table for s in seqs], [s.context_len for s in seqs]
    return DecodeRows(torch.tensor([s.query_start for s in seqs]),
                      {w: decode_plan(tables, lens, spec.block_size, windows=None if w is None else [w] * len(seqs))
                       for w in set(spec.layer_windows)})


def dense_meta(seqs: list[SeqStep], spec: AttentionSpec, dtype: torch.dtype, device: torch.device) -> DenseMeta:
    prefills = [(s, exact_prefill_plans(s, spec, dtype, device)) for s in seqs if s.phase is Phase.PREFILL]
    return DenseMeta(prefills, exact_decode_rows([s for s in seqs if s.phase is Phase.DECODE], spec))


def attend_prefill(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, seq: SeqStep, plan: PrefillPlan, scale: float) -> None:
    """A prefill chunk's rows of `out`, over the cache and its own fresh K/V."""
    s, e = seq.query_start, seq.query_start + seq.query_len
    out[:, s:e] = paged_prefill(q[:, s:e], k_cache, v_cache, seq.block_table, plan, scale, (k[:, s:e], v[:, s:e]))


def attend_decode(out: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  rows: torch.Tensor, plan: DecodePlan, scale: float) -> None:
    """Decoding rows of `out`, one query each."""
    out[:, rows] = paged_decode(q[:, rows].transpose(0, 1), k_cache, v_cache, plan, scale).transpose(0, 1)


def attend_exact(out: torch.Tensor, meta: DenseMeta, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 k_cache: torch.Tensor, v_cache: torch.Tensor, window: int | None, scale: float) -> None:
    for seq, plans in meta.prefills:
        attend_prefill(out, q, k, v, k_cache, v_cache, seq, plans[window], scale)
    if meta.decode is not None:
        attend_decode(out, q, k_cache, v_cache, meta.decode.rows, meta.decode.plans[window], scale)


@register_backend
class DenseBackend(AttentionBackend[DenseMeta]):
    name = "dense"
    capabilities = Capabilities(exact=True)

    def prepare(self, batch: BackendBatch[DenseMeta]) -> DenseMeta:
        return dense_meta(batch.seqs, self.spec, self.kv.spec.dtype, self.kv.device)

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: BackendBatch[DenseMeta],
                scale: float) -> torch.Tensor:
        self.store_kv(layer, k, v, batch.slot_mapping)
        out = torch.empty_like(q)
        attend_exact(out, batch.meta, layer, q, k, v, self.kv.k[layer], self.kv.v[layer],
                     self.spec.layer_windows[layer], scale)
        return out
