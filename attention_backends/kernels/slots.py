"""Attention over per-head slot lists: each query row attends to the cache slots chosen for it (the reference op
for K4: Loki's kept tokens, InfLLM-V2's selected blocks at decode).

Key sets are per KV head (`S = H_kv`: the heads of a group share one list) or per query head (`S = H_q`);
query head h reads set `h // (H_q / S)`, whose keys come from KV head `set // (S / H_kv)`.
"""

from __future__ import annotations

import torch

from attention_backends.kernels.dispatch import check_ids, use_triton
from attention_backends.kernels.paged import gather_head_slots, sdpa


def slot_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                   visible: torch.Tensor, scale: float) -> torch.Tensor:
    """q `[H_q, n, D]` (n rows, of one sequence or of several), slots `[S, n, m]` and which of them each row sees
    `[S, n, m]` -> `[H_q, n, D]`."""
    sets, hkv = slots.shape[0], k_cache.shape[2]
    if slots.dim() != 3 or slots.shape[1] != q.shape[1] or visible.shape != slots.shape or sets % hkv or \
            q.shape[0] % sets:
        raise ValueError(f"slot lists {tuple(slots.shape)} and visible {tuple(visible.shape)} do not fit queries "
                         f"{tuple(q.shape)} over {hkv} KV heads")
    if use_triton(q.device):
        from attention_backends.kernels import triton_slots

        if slots.device.type == "cpu":  # slot lists made on a GPU come from checked block tables; no sync for them
            check_ids(slots, k_cache.shape[0] * k_cache.shape[1], "slots")
        return triton_slots.slot_attention(q, k_cache, v_cache, slots.to(q.device), visible.to(q.device), scale)
    hq, n, d = q.shape
    k, v = (t.view(sets, n, -1, d) for t in gather_head_slots(k_cache, v_cache, slots.reshape(hkv, -1)))
    # One attention "head" per (set, row); its rows are the query heads that read the set.
    qq = q.view(sets, hq // sets, n, d).transpose(1, 2)
    out = sdpa(qq.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), scale, mask=visible.flatten(0, 1).unsqueeze(1))
    return out.view(sets, n, hq // sets, d).transpose(1, 2).reshape(hq, n, d)
