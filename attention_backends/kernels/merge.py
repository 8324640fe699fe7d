"""Attention over a shard of the keys with its log-sum-exp, and the exact merge of such partial results.

Splitting the keys of a softmax into shards and merging each shard's normalised output by its share of the
total mass, `A = sum_h exp(LSE_h - LSE) A_h` with `LSE = logsumexp_h LSE_h`, gives attention over all keys.
Star Attention's phase 2 merges one shard per rank this way. Both ops work in float32 and treat an empty
shard (no visible key: LSE = -inf, output 0) as contributing nothing.
"""

from __future__ import annotations

import torch

from attention_backends.kernels.dispatch import use_triton

_QUERY_TILE = 256  # query rows per score matrix, so a long query over a long shard stays in cache-sized pieces


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor | None,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q `[H_q, T, D]` over k/v `[H_kv, K, D]` (GQA: query head h reads KV head h // (H_q / H_kv)), `visible`
    `[T, K]` bool or None (all). Returns the normalised output `[H_q, T, D]` (zero for a row that sees no key)
    and the natural-log LSE of the scaled logits `[H_q, T]` (-inf for such a row), both float32."""
    hq, t, d = q.shape
    hkv = k.shape[0]
    g = hq // hkv
    out = torch.zeros(hq, t, d, dtype=torch.float32, device=q.device)
    lse = torch.full((hq, t), float("-inf"), dtype=torch.float32, device=q.device)
    if k.shape[1] == 0:
        return out, lse
    k32, v32 = k.float(), v.float()
    for s in range(0, t, _QUERY_TILE):
        e = min(s + _QUERY_TILE, t)
        qg = q[:, s:e].float().reshape(hkv, g * (e - s), d)
        scores = (qg @ k32.transpose(1, 2) * scale).view(hkv, g, e - s, -1)
        if visible is not None:
            scores = scores.masked_fill(~visible[s:e].to(q.device), float("-inf"))
        part = torch.logsumexp(scores, dim=-1)  # [H_kv, G, rows]
        probs = torch.exp(scores - torch.where(part.isfinite(), part, 0.0).unsqueeze(-1))
        out[:, s:e] = (probs.view(hkv, g * (e - s), -1) @ v32).view(hq, e - s, d)
        lse[:, s:e] = part.view(hq, e - s)
    return out, lse


def merge_attention_states(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge shard results: outs `[S, ..., D]` and lses `[S, ...]` (shard first) into `[..., D]` and `[...]`,
    exactly the attention over the union of the shards' keys. Max-stabilised, so no gap between shards
    overflows; a row whose every shard is empty stays zero with LSE -inf."""
    if use_triton(outs.device):
        from attention_backends.kernels import triton_merge

        return triton_merge.merge_attention_states(outs, lses)
    lses = lses.float()
    top = lses.amax(dim=0)
    top = torch.where(top.isfinite(), top, 0.0)
    weights = torch.exp(lses - top)  # an empty shard's -inf gives weight 0
    total = weights.sum(dim=0)
    merged = (weights.unsqueeze(-1) * outs.float()).sum(dim=0) / total.clamp_min(torch.finfo(torch.float32).tiny
                                                                                 ).unsqueeze(-1)
    return merged, top + torch.log(total)
