"""`loki`: Loki, low-rank keys for sparse attention (Singhania et al., NeurIPS 2024), over the paged cache.

Offline (`longserve calibrate --backend loki`): PCA of each layer's post-RoPE keys per KV head. Online, keys
are stored rotated into that orthonormal basis, queries are rotated alike (so exact attention over rotated
q and k equals attention over the originals), and each key's first d channels are also written to a side
table so that scoring reads only them. A decode query scores every cached token on d channels, keeps the
top `k_frac` of them (plus `sinks` and a `local_window`, never scored away) and attends exactly to those.
Selection is per KV group by default (the group's approximate scores summed: one gather serves its heads);
`selection: head` is the paper's per-query-head rule. Prefill is dense unless `prefill: topk`, which applies
the same per-row top-k to every prompt query, as the paper's accuracy runs did.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from attention_backends.base import Capabilities
from attention_backends.calibrated import CalibratedBackend, CalibratedParams
from attention_backends.context import BackendBatch, SeqStep
from attention_backends.dense import DenseBackend
from attention_backends.kernels.paged import gather_head_slots, sdpa
from attention_backends.registry import register_backend
from kv_cache.paged_kv import take_blocks

TILE_ELEMS = 1 << 23  # gathered K elements per tile of prefill rows in `prefill: topk`


class LokiParams(CalibratedParams):
    k_frac: float = Field(0.25, gt=0, le=1, description="tokens each decode query keeps, a fraction of its context")
    d_frac: float = Field(0.25, gt=0, le=1, description="principal channels the approximate scores read")
    sinks: int = Field(0, ge=0, description="first tokens always kept")
    local_window: int = Field(0, ge=0, description="most recent tokens always kept")
    selection: Literal["group", "head"] = Field("group", description="one token set per KV group, or per query head")
    prefill: Literal["dense", "topk"] = Field("dense", description="topk: the decode rule on every prompt row too")

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


@register_backend
class LokiBackend(CalibratedBackend, DenseBackend):
    name = "loki"
    Params = LokiParams
    capabilities = Capabilities(exact=False, needs_calibration=True)

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

    def lowrank(self, d: int):
        return self.kv.register_side_table(f"loki.keys.d{d}", (self.spec.block_size, self.spec.num_kv_heads, d),
                                           self.kv.spec.dtype)

    def prepare(self, batch: BackendBatch) -> None:
        self.split_phases(batch)  # decodes take Loki's own path: no dense decode tables
        by_artifact: dict[str, list[SeqStep]] = {}
        for s in batch.seqs:
            by_artifact.setdefault(self.artifact_key(s.params), []).append(s)
        batch.meta["rotations"] = [(self.artifact(seqs[0].params), _rows(seqs, len(batch.seqs), batch.num_tokens))
                                   for seqs in by_artifact.values()]
        by_rank: dict[int, list[SeqStep]] = {}
        for s in batch.seqs:
            by_rank.setdefault(s.params.rank(self.spec.head_dim), []).append(s)
        batch.meta["lowrank"] = [(d, _rows(seqs, len(batch.seqs), batch.num_tokens)) for d, seqs in by_rank.items()]

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: BackendBatch,
                scale: float) -> torch.Tensor:
        qr, kr = torch.empty_like(q), torch.empty_like(k)
        for basis, rows in batch.meta["rotations"]:
            kr[:, rows] = k[:, rows] @ basis.keys[layer].transpose(1, 2)
            qr[:, rows] = q[:, rows] @ basis.queries[layer].transpose(1, 2)
        self.store_kv(layer, kr, v, batch)
        hkv = self.spec.num_kv_heads
        for d, rows in batch.meta["lowrank"]:
            slots = batch.slot_mapping[rows].to(self.kv.device)
            self.lowrank(d).data[layer].view(-1, hkv, d)[slots] = kr[:, rows, :d].transpose(0, 1)
        out = torch.empty_like(q)
        for seq in batch.meta["prefill"]:
            if seq.params.prefill == "dense":
                self.prefill(layer, qr, kr, v, seq, scale, out)
            else:
                self.topk_prefill(layer, qr, seq, scale, out)
        for seq in batch.meta["decodes"]:
            self.sparse_rows(layer, qr, seq, seq.query_start, seq.context_len - 1, 1, scale, out)
        return out

    def topk_prefill(self, layer: int, qr: torch.Tensor, seq: SeqStep, scale: float, out: torch.Tensor) -> None:
        sets = 1 if seq.params.selection == "group" else self.spec.num_heads // self.spec.num_kv_heads
        tile = max(1, TILE_ELEMS // (self.spec.num_kv_heads * sets * seq.context_len * self.spec.head_dim))
        for t0 in range(0, seq.query_len, tile):
            n = min(tile, seq.query_len - t0)
            self.sparse_rows(layer, qr, seq, seq.query_start + t0, seq.num_cached + t0, n, scale, out)

    def sparse_rows(self, layer: int, qr: torch.Tensor, seq: SeqStep, start: int, pos: int, n: int, scale: float,
                    out: torch.Tensor) -> None:
        """Rows `start..start+n` of the batch (positions `pos..pos+n`): approximate scores on d channels, each
        row's top-k of its own context (causal), exact attention over the kept tokens."""
        p, (hq, hkv, dim) = seq.params, (self.spec.num_heads, self.spec.num_kv_heads, self.spec.head_dim)
        g, d, length, bs = hq // hkv, p.rank(dim), pos + n, self.spec.block_size
        table = seq.block_table[: math.ceil(length / bs)].to(self.kv.device)
        low = take_blocks(self.lowrank(d).data[layer], table).flatten(0, 1)[:length]  # [L, H_kv, d]
        q = qr[:, start : start + n]  # [H_q, n, D]
        approx = torch.einsum("hgnd,lhd->hgnl", q[..., :d].reshape(hkv, g, n, d), low)
        s = 1 if p.selection == "group" else g  # token sets per KV head
        if s == 1:
            approx = approx.sum(1, keepdim=True)
        qpos = torch.arange(pos, pos + n, device=approx.device).unsqueeze(1)
        kpos = torch.arange(length, device=approx.device)
        forced = ((kpos < p.sinks) | (kpos > qpos - p.local_window)) & (kpos <= qpos)
        approx = approx.masked_fill(forced, float("inf")).masked_fill(kpos > qpos, float("-inf"))
        budget = (p.k_frac * (qpos + 1)).long().clamp_min(1) + forced.sum(1, keepdim=True)  # [n, 1]
        top = approx.topk(int(budget.max().clamp_max(length)), -1)  # [H_kv, s, n, keep]
        keep = top.indices.shape[-1]
        visible = (torch.arange(keep, device=approx.device) < budget) & (top.values > float("-inf"))
        slots = table[top.indices // bs] * bs + top.indices % bs
        kk, vv = (t.view(hkv, s, n, keep, dim) for t in gather_head_slots(self.kv, layer, slots.view(hkv, -1)))
        # Rows of one attention call: (KV head, token set, query row); its queries are the heads sharing the set.
        qq = q.reshape(hkv, g, n, dim).transpose(1, 2).reshape(hkv, n, s, g // s, dim).transpose(1, 2)
        o = sdpa(qq.flatten(0, 2), kk.flatten(0, 2), vv.flatten(0, 2), scale, mask=visible.flatten(0, 2).unsqueeze(1))
        o = o.view(hkv, s, n, g // s, dim).transpose(1, 2).reshape(hkv, n, g, dim).transpose(1, 2)
        out[:, start : start + n] = o.reshape(hq, n, dim)


def _rows(seqs: list[SeqStep], total_seqs: int, num_tokens: int) -> torch.Tensor | slice:
    """The batch rows of `seqs`; every row when they are the whole batch."""
    if len(seqs) == total_seqs:
        return slice(0, num_tokens)
    return torch.cat([torch.arange(s.query_start, s.query_start + s.query_len) for s in seqs])

