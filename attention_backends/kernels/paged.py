"""PyTorch reference ops over the paged KV cache: slot indices, causal masks, prefill and decode attention.

Tensors are head-major as in the backend contract. On CPU these gather a sequence's blocks and call
`scaled_dot_product_attention`, whose fused kernel handles GQA without repeating K/V.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kv_cache.paged_kv import PagedKVCache


def context_slots(block_table: torch.Tensor, start: int, end: int, block_size: int) -> torch.Tensor:
    """Cache slots of positions `[start, end)` of a sequence."""
    return position_slots(block_table, torch.arange(start, end), block_size)


def position_slots(block_table: torch.Tensor, pos: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cache slots of a sequence's positions `pos`."""
    return block_table[pos // block_size] * block_size + pos % block_size


def gather_range(kv: PagedKVCache, layer: int, block_table: torch.Tensor, start: int, end: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of positions `[start, end)` of a sequence, head-major `[H_kv, end - start, D]`; reads
    only the blocks that hold them."""
    bs = kv.spec.block_size
    first = start // bs
    k, v = kv.gather(layer, block_table[first : -(-end // bs)])
    offset = first * bs
    return (t.flatten(0, 1)[start - offset : end - offset].transpose(0, 1) for t in (k, v))


def gather_context(kv: PagedKVCache, layer: int, block_table: torch.Tensor, length: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """A sequence's first `length` keys and values, head-major `[H_kv, length, D]`."""
    return gather_range(kv, layer, block_table, 0, length)


def gather_head_slots(kv: PagedKVCache, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V at cache slots chosen per KV head: `slots` `[..., H_kv, n]` -> `[..., H_kv, n, D]`, reading only the
    chosen head of each slot (one row gather over `[slots * H_kv, D]`, several times faster than indexing a
    permuted view)."""
    hkv, d = kv.spec.num_kv_heads, kv.spec.head_dim
    rows = (slots * hkv + torch.arange(hkv, device=slots.device).unsqueeze(1)).flatten().to(kv.device)
    return tuple(t[layer].view(-1, d).index_select(0, rows).view(*slots.shape, d) for t in (kv.k, kv.v))


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
    """Attention of `[B?, H_q, T, D]` queries over `[B?, H_kv, K, D]` keys, GQA expanded inside the kernel."""
    if q.dim() == 3:  # the fused CPU kernels take 4-D inputs (and masks) only; else the slow math path runs
        return sdpa(q[None], k[None], v[None], scale, mask[None] if mask is not None and mask.dim() == 3 else mask,
                    causal)[0]
    if mask is not None:
        mask = mask.to(q.device)  # masks are built on the CPU next to the block tables
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True)


def prefill_attention(q: torch.Tensor, k_ctx: torch.Tensor, v_ctx: torch.Tensor, num_cached: int, scale: float,
                      window: int | None = None) -> torch.Tensor:
    """One sequence's prefill chunk: q `[H_q, Tq, D]` at positions num_cached.., over its whole context
    `[H_kv, num_cached + Tq, D]`."""
    tq, tk = q.shape[1], k_ctx.shape[1]
    if num_cached == 0 and window is None:
        return sdpa(q, k_ctx, v_ctx, scale, causal=True)
    return sdpa(q, k_ctx, v_ctx, scale, mask=causal_mask(num_cached, tq, torch.arange(tk), window))


def padded_block_tables(block_tables: list[torch.Tensor], context_lens: list[int], block_size: int
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Block tables `[B, N_max]` covering each decoding sequence's context (padded with the null block), and
    the valid-key mask `[B, N_max * block_size]`, or None when every key is valid."""
    nblocks = [-(-n // block_size) for n in context_lens]
    tables = torch.zeros(len(context_lens), max(nblocks), dtype=torch.long)
    for i, (table, nb) in enumerate(zip(block_tables, nblocks)):
        tables[i, :nb] = table[:nb]
    lens = torch.tensor(context_lens).unsqueeze(1)
    valid = torch.arange(tables.shape[1] * block_size).unsqueeze(0) < lens
    return tables, None if bool(valid.all()) else valid


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None, scale: float
                     ) -> torch.Tensor:
    """Batched decode: q `[B, H_q, D]`, k/v `[B, L, H_kv, D]` gathered from the cache, valid `[B, L]` or None."""
    mask = None if valid is None else valid[:, None, None, :]
    out = sdpa(q.unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2), scale, mask=mask)
    return out.squeeze(2)
