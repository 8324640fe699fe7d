"""Score the cached tokens, keep the top k, attend exactly to those: the shape of Loki and of kvpress's scorer presses.

A subclass supplies `score`; the base does the rest. Each query row keeps the `k_frac` share of the keys up to
its position (at least `min_keep`) that score highest, plus the first `sinks` tokens and the `local_window` most
recent ones, which are never scored away, and attends exactly to what it kept through the kernel layer's slot
attention. Scores come per key set: one per KV head (the heads of a group share what they keep: one gather
serves them) or one per query head. Prefill is exact unless `prefill: topk` applies the decode rule to every
prompt row. With `k_frac` 1 every key is kept, which is dense attention.

The dense floor: a row whose context is shorter than `dense_len` keeps every key (a step wholly under it takes
the exact path, as `dense` computes it), so short prompts cost nothing. A top-k over a few dozen tokens keeps a
handful of them, which a small model does not survive (a 37-token question kept 9 tokens and lost its answer).
The default 2,048 is measured on the embedded model: up to it a decode step grows little with the context
(dense's TPOT: 78 ms at 1k, 88 ms at 2k, 133 ms at 7k in the issue-18 matrix, BENCHMARKS.md), so top-k has
little to save there, and with it Loki's served recipe gave dense's answer in every cell of that matrix.
`min_keep` bounds how few keys a row keeps past the floor when `k_frac` or `dense_len` is set low.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from attention_backends.base import AttentionBackend, Capabilities
from attention_backends.context import BackendBatch, MetaT, Phase, SeqStep
from attention_backends.dense import DenseMeta, attend_exact, dense_meta
from attention_backends.kernels.paged import cdiv
from attention_backends.kernels.slots import slot_attention
from attention_backends.kernels.topk import keep_top, scored_budget

TILE_ELEMS = 1 << 23  # gathered K elements per tile of prefill rows in `prefill: topk`


class ScorerParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    k_frac: float = Field(0.25, gt=0, le=1, description="tokens each decode query keeps, a fraction of its context")
    sinks: int = Field(0, ge=0, description="first tokens always kept")
    local_window: int = Field(0, ge=0, description="most recent tokens always kept")
    min_keep: int = Field(256, ge=1, description="tokens a query keeps at least (sinks and local ones aside)")
    dense_len: int = Field(2048, ge=0, description="a query whose context is shorter than this keeps every token")
    prefill: Literal["dense", "topk"] = Field("dense", description="topk: the decode rule on every prompt row too")


@dataclass(frozen=True, slots=True)
class ScorerMeta:
    exact: DenseMeta  # prefill chunks attended exactly
    topk_prefills: list[SeqStep]
    decodes: list[SeqStep]


class ScorerBackend(AttentionBackend[MetaT]):
    Params = ScorerParams
    capabilities = Capabilities(exact=False)

    def score(self, layer: int, q: torch.Tensor, seq: SeqStep, pos: int) -> torch.Tensor:
        """Query rows q `[H_q, n, D]` at positions `pos..pos+n-1` of `seq` -> scores `[S, n, pos + n]` of its keys up
        to the last row, higher kept first, per key set (S = H_kv or H_q). Keys past a row's position are masked."""
        raise NotImplementedError

    def key_sets(self, params: ScorerParams) -> int:
        """How many key sets `score` returns for these params."""
        return self.spec.num_kv_heads

    def prepare(self, batch: BackendBatch[MetaT]) -> MetaT:
        return self.scorer_meta(batch)

    def scorer_meta(self, batch: BackendBatch) -> ScorerMeta:
        def exact(s: SeqStep) -> bool:  # a step wholly under the floor keeps every key: dense's own path
            return s.context_len < s.params.dense_len or (s.phase is Phase.PREFILL and s.params.prefill == "dense")

        sparse = [s for s in batch.seqs if not exact(s)]
        return ScorerMeta(dense_meta([s for s in batch.seqs if exact(s)], self.spec, self.kv),
                          [s for s in sparse if s.phase is Phase.PREFILL],
                          [s for s in sparse if s.phase is Phase.DECODE])

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: BackendBatch[MetaT],
                scale: float) -> torch.Tensor:
        self.store_kv(layer, k, v, batch.slot_mapping)
        return self.attend(layer, q, k, v, batch.meta, scale)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: ScorerMeta, scale: float
               ) -> torch.Tensor:
        """Exact prefill and top-k rows, for queries and fresh keys in the space the cache holds."""
        out = torch.empty_like(q)
        attend_exact(out, meta.exact, q, k, v, self.kv.k[layer], self.kv.v[layer], self.spec.layer_windows[layer],
                     scale)
        for seq in meta.topk_prefills:
            per_row = self.key_sets(seq.params) * seq.context_len * self.spec.head_dim
            tile = max(1, TILE_ELEMS // per_row)
            for t0 in range(0, seq.query_len, tile):
                n = min(tile, seq.query_len - t0)
                self.topk_rows(layer, q, seq, seq.query_start + t0, seq.num_computed_tokens + t0, n, scale, out)
        for seq in meta.decodes:
            self.topk_rows(layer, q, seq, seq.query_start, seq.context_len - 1, 1, scale, out)
        return out

    def topk_rows(self, layer: int, q: torch.Tensor, seq: SeqStep, start: int, pos: int, n: int, scale: float,
                  out: torch.Tensor) -> None:
        """Rows `start..start+n` of the batch (positions `pos..pos+n`): each row's top keys of its own context."""
        p, bs, length = seq.params, self.spec.block_size, pos + n
        rows = q[:, start : start + n]
        budget = scored_budget(torch.arange(pos + 1, length + 1).unsqueeze(1), p.k_frac, p.min_keep, p.dense_len)
        indices, visible = keep_top(self.score(layer, rows, seq, pos), pos, sinks=p.sinks,
                                    local_window=p.local_window, budget=budget)
        table = seq.block_table[: cdiv(length, bs)].to(indices.device)
        slots = table[indices // bs] * bs + indices % bs
        out[:, start : start + n] = slot_attention(rows, self.kv.k[layer], self.kv.v[layer], slots, visible, scale)
