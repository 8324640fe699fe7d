"""Which keys a scored query row keeps: the top share of its context, with sink and recent tokens never scored
away and a dense floor; Loki's approximate scores over the first d rotated channels; and Loki's whole decode
(score, keep, attend) as one op. The rule of longserve's scorer backends and of the vLLM plugin's Loki, in one place.

`lowrank_topk_decode` runs longserve's C++ CPU kernel (`csrc/topk_decode.cpp`: the rows of a step in one call per
layer, reading the cache in place) where it runs, else its reference below, row by row through `keep_top` and
`slot_attention` (whose Triton kernel serves CUDA).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from attention_backends.kernels.dispatch import check_ids, use_cpp, use_triton
from attention_backends.kernels.paged import cdiv, padded_tables, take_blocks
from attention_backends.kernels.slots import slot_attention


class KeepRule(Protocol):
    """A request's keep rule (longserve's `ScorerParams`)."""

    sinks: int
    local_window: int
    k_frac: float
    min_keep: int
    dense_len: int


def scored_budget(lengths: torch.Tensor, k_frac: float, min_keep: int, dense_len: int) -> torch.Tensor:
    """How many keys a row with `lengths` keys of context keeps by score, besides its sink and local ones: `k_frac`
    of its context, at least `min_keep`; every key when its context is shorter than `dense_len`."""
    return torch.where(lengths < dense_len, lengths, (k_frac * lengths).long().clamp_min(min_keep))


def keep_top(scores: torch.Tensor, pos: int, *, sinks: int, local_window: int, budget: torch.Tensor | int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows at positions `pos..pos+n-1` with `scores` `[S, n, L]` of keys `0..L-1` (higher kept first) -> the kept
    keys' positions `[S, n, keep]` and which of them each row sees. A row keeps its first `sinks` and last
    `local_window` tokens and the `budget` (per row: `[n, 1]`) best-scoring others."""
    n, length = scores.shape[1:]
    qpos = torch.arange(pos, pos + n, device=scores.device).unsqueeze(1)
    kpos = torch.arange(length, device=scores.device)
    forced = ((kpos < sinks) | (kpos > qpos - local_window)) & (kpos <= qpos)
    scores = scores.masked_fill(forced, float("inf")).masked_fill(kpos > qpos, float("-inf"))
    total = torch.as_tensor(budget, device=scores.device) + forced.sum(1, keepdim=True)  # [n, 1]
    top = scores.topk(int(total.max().clamp_max(length)), -1)  # [S, n, keep]
    visible = (torch.arange(top.indices.shape[-1], device=scores.device) < total) & (top.values > float("-inf"))
    return top.indices, visible


def lowrank_scores(q: torch.Tensor, low: torch.Tensor, per_group: bool) -> torch.Tensor:
    """Rotated queries `[H_q, n, D]` against keys' first d rotated channels `[L, H_kv, d]` -> `[S, n, L]`: per KV
    group with the group's queries summed (S = H_kv, the sum of its heads' scores), or per query head (S = H_q)."""
    hq, n = q.shape[:2]
    hkv, d = low.shape[1:]
    heads = q[..., :d].reshape(hkv, hq // hkv, n, d)
    if per_group:
        return torch.einsum("hnd,lhd->hnl", heads.sum(1), low)
    return torch.einsum("hgnd,lhd->hgnl", heads, low).reshape(hq, n, low.shape[0])


@dataclass(frozen=True, slots=True)
class TopkDecodePlan:
    """Decoding rows over their block tables `[B, N]` and `limits` `[4, B]` (context lengths, sink tokens, local
    windows, scored budgets), int32 on the cache's device; `kernel` "cpp" or "torch"."""

    block_tables: torch.Tensor
    limits: torch.Tensor
    kernel: str


def topk_decode_plan(block_tables: Sequence[torch.Tensor], seq_lens: Sequence[int], rules: Sequence[KeepRule],
                     device: torch.device | str = "cpu", num_blocks: int | None = None) -> TopkDecodePlan:
    """Plan one query per row, at the end of its `seq_lens` keys, under its request's keep rule."""
    lens = torch.tensor(list(seq_lens))
    tables = padded_tables(block_tables)
    if num_blocks is not None:
        check_ids(tables, num_blocks, "block ids")
    budgets = torch.stack([scored_budget(n, r.k_frac, r.min_keep, r.dense_len) for n, r in zip(lens, rules)])
    limits = torch.stack([lens, torch.tensor([r.sinks for r in rules]), torch.tensor([r.local_window for r in rules]),
                          budgets.clamp_max(torch.iinfo(torch.int32).max)])
    kernel = "cpp" if not use_triton(device) and use_cpp(device) else "torch"
    return TopkDecodePlan(tables.to(device, torch.int32), limits.to(device, torch.int32), kernel)


def lowrank_topk_decode(q: torch.Tensor, low: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        plan: TopkDecodePlan, sets: int, scale: float, *, query_rotation: torch.Tensor | None = None,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """q `[B, H_q, D]`, one query per row, over the keys its rule keeps by the scores of the low-rank keys `low`
    `[num_blocks, block_size, H_kv, d]` (the first d rotated channels, beside the cache or in it) -> `[B, H_q, D]`,
    written into `out` (contiguous) when given. q is rotated already, or by `query_rotation` `[H_kv, D, D]` here,
    each KV head's query heads by its matrix. Key sets: one per KV head (`sets` = H_kv) or per query head (`sets` =
    H_q)."""
    if plan.kernel == "cpp":
        from attention_backends.kernels import cpu_ext

        return cpu_ext.load().lowrank_topk_decode(q.contiguous(), low, k_cache, v_cache, plan.block_tables,
                                                  plan.limits, sets, scale,
                                                  None if query_rotation is None else query_rotation.contiguous(), out)
    if query_rotation is not None:
        q = (q.unflatten(1, (query_rotation.shape[0], -1)) @ query_rotation).flatten(1, 2)
    bs = k_cache.shape[1]
    out = torch.empty_like(q) if out is None else out
    for b, (length, sinks, local, budget) in enumerate(plan.limits.T.tolist()):
        table = plan.block_tables[b, : cdiv(length, bs)].long()
        rows = q[b].unsqueeze(1)  # [H_q, 1, D]
        scores = lowrank_scores(rows, take_blocks(low, table).flatten(0, 1)[:length], per_group=sets != q.shape[1])
        indices, visible = keep_top(scores, length - 1, sinks=sinks, local_window=local, budget=budget)
        slots = table[indices // bs] * bs + indices % bs
        out[b] = slot_attention(rows, k_cache, v_cache, slots, visible, scale)[:, 0]
    return out
