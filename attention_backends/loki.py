"""`loki`: Loki, low-rank keys for sparse attention (Singhania et al., NeurIPS 2024), over the paged cache.

Offline (`longserve calibrate --backend loki`): PCA of each layer's post-RoPE keys per KV head. Online, keys
are stored rotated into that orthonormal basis, queries are rotated alike (so exact attention over rotated
q and k equals attention over the originals), and each key's first d channels are also written to a side
table (each block's channels one after the other) so that scoring reads only them. A decode query scores every
cached token on d channels, keeps the top `k_frac` of them (plus `sinks` and a `local_window`, never scored away)
and attends exactly to those: one kernel-layer op per layer for the step's decodes (`lowrank_topk_decode`, C++ on
the CPU). A query whose context is shorter than `dense_len` keeps every token (the floor, `scorer.py`).
Selection is per KV group by default (the group's approximate scores summed: one gather serves its heads);
`selection: head` is the paper's per-query-head rule. Prefill is dense unless `prefill: topk`, which applies
the same per-row top-k to every prompt query, as the paper's accuracy runs did.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
from pydantic import Field

from attention_backends.calibration import CalibratedBackend, CalibratedParams
from attention_backends.context import BackendBatch, SeqStep
from attention_backends.kernels.paged import cdiv, row_index, take_blocks, write_slots
from attention_backends.kernels.topk import TopkDecodePlan, lowrank_scores, lowrank_topk_decode, topk_decode_plan
from attention_backends.registry import register_backend
from attention_backends.scorer import ScorerBackend, ScorerMeta, ScorerParams


class LokiParams(ScorerParams, CalibratedParams):
    # Top-k alone (the paper's rule, tuned on 7B-13B models) loses needles from 4k on with the embedded model;
    # keeping the first 64 and the last 256 tokens restores them at the same k (BENCHMARKS.md, issue 18).
    sinks: int = Field(64, ge=0, description="first tokens always kept")
    local_window: int = Field(256, ge=0, description="most recent tokens always kept")
    d_frac: float = Field(0.25, gt=0, le=1, description="principal channels the approximate scores read")
    selection: Literal["group", "head"] = Field("group", description="one token set per KV group, or per query head")

    def rank(self, head_dim: int) -> int:
        return max(1, round(self.d_frac * head_dim))


@dataclass(frozen=True, slots=True)
class Basis:
    keys: torch.Tensor  # [layers, H_kv, D, D]: rows are the principal directions, by explained variance
    queries: torch.Tensor  # [layers, H_q, D, D]: the same per query head


class PCACalibrator:
    """Per layer and KV head: mean, principal directions and explained-variance ratios of the keys."""

    def __init__(self) -> None:
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def observe(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
        x = k.double().cpu()
        mean = x.mean(1)
        xc = x - mean[:, None]
        evals, evecs = torch.linalg.eigh(xc.transpose(1, 2) @ xc / (x.shape[1] - 1))  # ascending
        evals = evals.flip(-1).clamp_min(0)
        self.layers[layer] = (evecs.flip(-1).transpose(1, 2).float(), mean.float(),
                              (evals / evals.sum(-1, keepdim=True)).float())

    def result(self) -> dict[str, torch.Tensor]:
        comps, means, ratios = zip(*(self.layers[i] for i in sorted(self.layers)))
        return {"components": torch.stack(comps), "mean": torch.stack(means),
                "explained_variance_ratio": torch.stack(ratios)}


@dataclass(frozen=True, slots=True)
class LokiDecodes:
    """Decoding rows past their floor that share a rank d and a kind of key set, in one fused decode per layer."""

    rows: torch.Tensor | slice  # [B] rows of the batch (`row_index`)
    rank: int
    sets: int  # key sets: H_kv (group selection) or H_q
    plan: TopkDecodePlan


@dataclass(frozen=True, slots=True)
class LokiMeta:
    scorer: ScorerMeta  # exact rows and `prefill: topk` chunks (its decodes are in `decodes`)
    rotations: list[tuple[Basis, torch.Tensor | slice]]  # each artifact's basis and the batch rows it rotates
    lowrank: list[tuple[int, torch.Tensor | slice]]  # each rank d and the batch rows whose keys it keeps
    decodes: list[LokiDecodes]


@register_backend
class LokiBackend(CalibratedBackend[LokiMeta], ScorerBackend[LokiMeta]):
    name = "loki"
    Params = LokiParams

    def calibrator(self, params: LokiParams) -> PCACalibrator:
        return PCACalibrator()

    def from_tensors(self, tensors: dict[str, torch.Tensor]) -> Basis:
        comps = tensors["components"]
        want = (self.spec.num_layers, self.spec.num_kv_heads, self.spec.head_dim, self.spec.head_dim)
        if tuple(comps.shape) != want:
            raise ValueError(f"the Loki artifact's components are {tuple(comps.shape)}, this model needs {want}")
        comps = comps.to(self.kv.device, self.kv.spec.dtype)
        group = self.spec.num_heads // self.spec.num_kv_heads
        return Basis(comps, comps.repeat_interleave(group, 1))

    def lowrank(self, d: int, layer: int) -> torch.Tensor:
        """The keys' first d rotated channels, `[num_blocks, block_size, H_kv, d]`: a side table that holds each
        block's channels one after the other (positions contiguous), so scoring a block is d vector products."""
        table = self.kv.register_side_table(f"loki.keys.d{d}", (self.spec.num_kv_heads, d, self.spec.block_size),
                                            self.kv.spec.dtype)
        return table.data[layer].permute(0, 3, 1, 2)

    def key_sets(self, params: LokiParams) -> int:
        return self.spec.num_kv_heads if params.selection == "group" else self.spec.num_heads

    def prepare(self, batch: BackendBatch[LokiMeta]) -> LokiMeta:
        by_artifact: dict[str, list[SeqStep]] = {}
        by_rank: dict[int, list[SeqStep]] = {}
        for s in batch.seqs:
            by_artifact.setdefault(self.artifact_key(s.params), []).append(s)
            by_rank.setdefault(s.params.rank(self.spec.head_dim), []).append(s)
        n, t = len(batch.seqs), batch.num_tokens
        scorer = self.scorer_meta(batch)
        by_kind: dict[tuple[int, int], list[SeqStep]] = {}
        for s in scorer.decodes:
            by_kind.setdefault((s.params.rank(self.spec.head_dim), self.key_sets(s.params)), []).append(s)
        decodes = [LokiDecodes(row_index([s.query_start for s in seqs]), d, sets,
                               topk_decode_plan([s.block_table for s in seqs], [s.context_len for s in seqs],
                                                [s.params for s in seqs], self.kv.device, self.kv.num_blocks))
                   for (d, sets), seqs in by_kind.items()]
        return LokiMeta(replace(scorer, decodes=[]),
                        [(self.artifact(seqs[0].params), _rows(seqs, n, t)) for seqs in by_artifact.values()],
                        [(d, _rows(seqs, n, t)) for d, seqs in by_rank.items()], decodes)

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: BackendBatch[LokiMeta],
                scale: float) -> torch.Tensor:
        meta = batch.meta
        qr, kr = torch.empty_like(q), torch.empty_like(k)
        for basis, rows in meta.rotations:
            kr[:, rows] = k[:, rows] @ basis.keys[layer].transpose(1, 2)
            qr[:, rows] = q[:, rows] @ basis.queries[layer].transpose(1, 2)
        self.store_kv(layer, kr, v, batch.slot_mapping)
        for d, rows in meta.lowrank:
            write_slots(self.lowrank(d, layer), kr[:, rows, :d].transpose(0, 1), batch.slot_mapping[rows])
        out = self.attend(layer, qr, kr, v, meta.scorer, scale)
        for dec in meta.decodes:
            q_rows = qr[:, dec.rows].transpose(0, 1)
            out[:, dec.rows] = lowrank_topk_decode(q_rows, self.lowrank(dec.rank, layer), self.kv.k[layer],
                                                   self.kv.v[layer], dec.plan, dec.sets, scale).transpose(0, 1)
        return out

    def score(self, layer: int, q: torch.Tensor, seq: SeqStep[LokiParams, None], pos: int) -> torch.Tensor:
        """The rotated queries' dot products with the keys' first d rotated channels, summed over a KV group's heads
        for group selection."""
        p, bs, length = seq.params, self.spec.block_size, pos + q.shape[1]
        table = seq.block_table[: cdiv(length, bs)].to(self.kv.device)
        low = take_blocks(self.lowrank(p.rank(self.spec.head_dim), layer), table).flatten(0, 1)[:length]
        return lowrank_scores(q, low, per_group=p.selection == "group")


def _rows(seqs: list[SeqStep], total_seqs: int, num_tokens: int) -> torch.Tensor | slice:
    """The batch rows of `seqs`; every row when they are the whole batch."""
    if len(seqs) == total_seqs:
        return slice(0, num_tokens)
    return torch.cat([torch.arange(s.query_start, s.query_start + s.query_len) for s in seqs])
