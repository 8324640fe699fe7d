"""PyTorch reference ops over the paged KV cache: slot indices, causal masks, prefill and decode attention.

Tensors are head-major as in the backend contract. On CPU these gather a sequence's blocks and call
`scaled_dot_product_attention`, whose fused kernel handles GQA without repeating K/V.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def context_slots(block_table: torch.Tensor, start: int, end: int, block_size: int) -> torch.Tensor:
    """Cache slots of positions `[start, end)` of a sequence."""
    pos = torch.arange(start, end)
    return block_table[pos // block_size] * block_size + pos % block_size


def causal_mask(num_cached: int, query_len: int, key_positions: torch.Tensor, window: int | None) -> torch.Tensor:
    """`[query_len, K]` bool: query i (at position num_cached + i) sees key position j iff j <= its position
    and, with a window W, its position - j < W (HF semantics: W keys including itself)."""
    qpos = torch.arange(num_cached, num_cached + query_len).unsqueeze(1)
    kpos = key_positions.unsqueeze(0)
    mask = kpos <= qpos
    if window is not None:
        mask &= qpos - kpos < window
    return mask


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None = None,
         causal: bool = False) -> torch.Tensor:
    """Attention of `[..., H_q, T, D]` queries over `[..., H_kv, K, D]` keys, GQA expanded inside the kernel."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True)


def prefill_attention(q: torch.Tensor, k_ctx: torch.Tensor, v_ctx: torch.Tensor, num_cached: int, scale: float,
                      window: int | None = None) -> torch.Tensor:
    """One sequence's prefill chunk: q `[H_q, Tq, D]` at positions num_cached.., over its whole context
    `[H_kv, num_cached + Tq, D]`."""
    tq, tk = q.shape[1], k_ctx.shape[1]
    if num_cached == 0 and window is None:
        return sdpa(q, k_ctx, v_ctx, scale, causal=True)
    return sdpa(q, k_ctx, v_ctx, scale, mask=causal_mask(num_cached, tq, torch.arange(tk), window))


def decode_slots(block_tables: list[torch.Tensor], context_lens: list[int], block_size: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded slot indices `[B, L_max]` of each decoding sequence's context and the valid-key mask."""
    lmax = max(context_lens)
    slots = torch.zeros(len(context_lens), lmax, dtype=torch.long)
    valid = torch.zeros(len(context_lens), lmax, dtype=torch.bool)
    for i, (table, n) in enumerate(zip(block_tables, context_lens)):
        slots[i, :n] = context_slots(table, 0, n, block_size)
        valid[i, :n] = True
    return slots, valid


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, scale: float
                     ) -> torch.Tensor:
    """Batched decode: q `[B, H_q, D]`, k/v `[B, L, H_kv, D]` gathered from the cache, valid `[B, L]`."""
    out = sdpa(q.unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2), scale, mask=valid[:, None, None, :])
    return out.squeeze(2)
