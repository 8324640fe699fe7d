"""Which keys a scored query row keeps: the top share of its context, with sink and recent tokens never scored
away and a dense floor; and Loki's approximate scores over the first d rotated channels. The rule of longserve's
scorer backends and of the vLLM plugin's Loki, in one place.
"""

from __future__ import annotations

import torch


def keep_top(scores: torch.Tensor, pos: int, *, sinks: int, local_window: int, k_frac: float, min_keep: int,
             dense_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows at positions `pos..pos+n-1` with `scores` `[S, n, L]` of keys `0..L-1` (higher kept first) -> the kept
    keys' positions `[S, n, keep]` and which of them each row sees. A row keeps `k_frac` of its context (at least
    `min_keep`) besides its first `sinks` and last `local_window` tokens; a row whose context is shorter than
    `dense_len` keeps all of it."""
    n, length = scores.shape[1:]
    qpos = torch.arange(pos, pos + n, device=scores.device).unsqueeze(1)
    kpos = torch.arange(length, device=scores.device)
    forced = ((kpos < sinks) | (kpos > qpos - local_window)) & (kpos <= qpos)
    scores = scores.masked_fill(forced, float("inf")).masked_fill(kpos > qpos, float("-inf"))
    budget = (k_frac * (qpos + 1)).long().clamp_min(min_keep) + forced.sum(1, keepdim=True)  # [n, 1]
    budget = torch.where(qpos + 1 < dense_len, qpos + 1, budget)  # rows of a chunk across the floor
    top = scores.topk(int(budget.max().clamp_max(length)), -1)  # [S, n, keep]
    visible = (torch.arange(top.indices.shape[-1], device=scores.device) < budget) & (top.values > float("-inf"))
    return top.indices, visible


def lowrank_scores(q: torch.Tensor, low: torch.Tensor, per_group: bool) -> torch.Tensor:
    """Rotated queries `[H_q, n, D]` against keys' first d rotated channels `[L, H_kv, d]` -> `[S, n, L]`: summed
    over each KV group's query heads (S = H_kv), or per query head (S = H_q)."""
    hq, n = q.shape[:2]
    hkv, d = low.shape[1:]
    approx = torch.einsum("hgnd,lhd->hgnl", q[..., :d].reshape(hkv, hq // hkv, n, d), low)
    return approx.sum(1) if per_group else approx.reshape(hq, n, low.shape[0])
