"""Reading and writing a paged cache given as tensors, and the attention call every reference op ends in.

A cache is a pair of tensors `k_cache`, `v_cache` of logical shape `[num_blocks, block_size, H_kv, D]`, any
strides (longserve's are contiguous views of one tensor per layer; a vLLM cache is the same logical shape
with other strides). A slot is `block_id * block_size + offset`. Returned keys and values are head-major,
`[H_kv, n, D]`, as the backend contract's tensors are.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from attention_backends.kernels.dispatch import use_cpp


def cdiv(a: int, b: int) -> int:
    """Ceiling division."""
    return -(-a // b)


def check_keep(keep: torch.Tensor | None, k_cache: torch.Tensor) -> None:
    """A keep mask (TCA's kept tokens), when given, is a bool `[num_blocks, block_size, H_kv]` beside the cache."""
    if keep is not None and (keep.dtype != torch.bool or keep.shape != k_cache.shape[:3]):
        raise ValueError(f"keep must be a bool tensor of shape {tuple(k_cache.shape[:3])}, got {keep.dtype} "
                         f"{tuple(keep.shape)}")


def take_blocks(t: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """`t[block_ids]` of a per-block tensor `[num_blocks, ...]`; a view, not a copy, when the ids are consecutive."""
    flat = block_ids.flatten()
    n = flat.numel()
    if n and int(flat[-1]) - int(flat[0]) == n - 1 and (n == 1 or bool((flat.diff() == 1).all())):
        first = int(flat[0])
        return t[first : first + n].view(*block_ids.shape, *t.shape[1:])
    return t.index_select(0, flat.to(t.device)).view(*block_ids.shape, *t.shape[1:])


def row_index(rows: list[int]) -> torch.Tensor | slice:
    """Rows of a packed batch, as a slice when they are consecutive (a step of decodes): indexing by it is a view,
    where a tensor of rows would copy them out and scatter the results back."""
    if rows and rows == list(range(rows[0], rows[0] + len(rows))):
        return slice(rows[0], rows[0] + len(rows))
    return torch.tensor(rows, dtype=torch.long)


def padded_tables(block_tables: Sequence[torch.Tensor], dtype: torch.dtype = torch.long) -> torch.Tensor:
    """Rows' block tables of any lengths as one `[B, N]` tensor, each padded with the null block 0."""
    out = torch.zeros(len(block_tables), max(len(t) for t in block_tables), dtype=dtype)
    for i, table in enumerate(block_tables):
        out[i, : len(table)] = table
    return out


def position_slots(block_table: torch.Tensor, pos: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cache slots of a sequence's positions `pos`."""
    return block_table[pos // block_size] * block_size + pos % block_size


def context_slots(block_table: torch.Tensor, start: int, end: int, block_size: int) -> torch.Tensor:
    """Cache slots of positions `[start, end)` of a sequence."""
    return position_slots(block_table, torch.arange(start, end), block_size)


def write_slots(cache: torch.Tensor, x: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store new tokens' rows `x` `[T, H, C]` at `slot_mapping` `[T]` of `cache` `[num_blocks, block_size, H, C]`;
    on the CPU, slots below 0 (vLLM's padding) are skipped. The CPU runs longserve's C++ op (one call, not four)."""
    if use_cpp(cache.device):
        from attention_backends.kernels import cpu_ext

        cpu_ext.load().write_slots(cache, x, slot_mapping.long().contiguous())
        return
    slots = slot_mapping.to(cache.device)
    if slots.device.type == "cpu" and bool((slots < 0).any()):  # no such check on a GPU: it would wait for it
        x, slots = x[slots >= 0], slots[slots >= 0]
    cache[slots // cache.shape[1], slots % cache.shape[1]] = x


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor, key_rotation: torch.Tensor | None = None) -> None:
    """Store new tokens' K/V, `k`/`v` `[T, H_kv, D]`, at `slot_mapping` `[T]` (see `write_slots`); with
    `key_rotation` `[H_kv, D, D]`, each head's keys as `k @ key_rotation[head]` (a backend keeping keys in another
    basis, Loki's). One C++ call on the CPU: a decode step stores one token per layer."""
    if use_cpp(k_cache.device):
        from attention_backends.kernels import cpu_ext

        cpu_ext.load().write_kv(k_cache, v_cache, k, v, slot_mapping.long().contiguous(),
                                None if key_rotation is None else key_rotation.contiguous())
        return
    if key_rotation is not None:
        k = torch.bmm(k.transpose(0, 1), key_rotation).transpose(0, 1)
    write_slots(k_cache, k, slot_mapping)
    write_slots(v_cache, v, slot_mapping)


def gather_range(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor, start: int, end: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V of positions `[start, end)` of a sequence, `[H_kv, end - start, D]`; reads only the blocks holding them
    (no copy when those blocks are consecutive)."""
    bs = k_cache.shape[1]
    first = start // bs
    ids = block_table[first : cdiv(end, bs)]
    offset = first * bs
    return tuple(take_blocks(c, ids).flatten(0, 1)[start - offset : end - offset].transpose(0, 1)
                 for c in (k_cache, v_cache))


def _vectors(cache: torch.Tensor) -> torch.Tensor:
    """The cache as rows of D elements starting at every element offset (rows overlap; only read): one row gather
    then serves any layout whose head dimension is contiguous, several times faster than indexing three dims."""
    if cache.stride(-1) != 1:
        raise ValueError("a KV cache's head dimension must be contiguous")
    span = sum((n - 1) * st for n, st in zip(cache.shape[:-1], cache.stride()[:-1])) + 1
    return cache.as_strided((span, cache.shape[-1]), (1, 1))


def gather_head_slots(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V at cache slots chosen per KV head: `slots` `[H_kv, ...]` (row h read from KV head h) -> `[H_kv, ..., D]`."""
    bs, hkv, d = k_cache.shape[1:]
    s = slots.to(k_cache.device)
    heads = torch.arange(hkv, device=s.device).view(hkv, *([1] * (s.dim() - 1)))
    blocks, offsets = s // bs, s % bs
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:  # e.g. vLLM's CPU cache, whose keys are stored transposed
        return k_cache[blocks, offsets, heads], v_cache[blocks, offsets, heads]

    def rows(cache: torch.Tensor) -> torch.Tensor:
        s0, s1, s2, _ = cache.stride()
        return (blocks * s0 + offsets * s1 + heads * s2).flatten()

    k_rows = rows(k_cache)
    v_rows = k_rows if v_cache.stride() == k_cache.stride() else rows(v_cache)
    return (_vectors(k_cache).index_select(0, k_rows).view(*s.shape, d),
            _vectors(v_cache).index_select(0, v_rows).view(*s.shape, d))


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None = None,
         causal: bool = False) -> torch.Tensor:
    """Attention of `[B?, H_q, T, D]` queries over `[B?, H_kv, K, D]` keys, GQA expanded inside the kernel; `mask`
    bool or additive, broadcast to `[B?, H_q, T, K]`."""
    if q.dim() == 3:  # the fused CPU kernels take 4-D inputs (and masks) only; else the slow math path runs
        return sdpa(q[None], k[None], v[None], scale, mask[None] if mask is not None and mask.dim() == 3 else mask,
                    causal)[0]
    if mask is not None:
        mask = mask.to(q.device)  # masks are built on the CPU next to the block tables
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True)
