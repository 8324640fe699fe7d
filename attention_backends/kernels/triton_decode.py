"""Triton K1: paged decode with split-K (flash-decoding), the kernel beside `decode.paged_decode`.

Grid (row, KV head, split). A program packs the query heads of one KV group into a 16-row tile and walks its
split of the row's visible key list `[0, sinks) ∪ [lo, L)` through the block table, reading K/V in place; each
split writes its normalised output and LSE, and K5 merges the splits (one split writes the output directly).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attention_backends.kernels.triton_common import (
    attend_tile,
    finish,
    key_strides,
    load_kv_kept,
    pow2,
    softmax_state,
)
from attention_backends.kernels.triton_merge import merge_attention_states


@triton.jit
def _decode(q, k_cache, v_cache, tables, ranges, keep, out, lse, scale, n_rows, s_qb, s_qh, s_kb, s_ks, s_kh, s_vb,
            s_vs, s_vh, s_tb, s_ob, s_oh, s_os, s_lb, s_lh, G: tl.constexpr, BLOCK_H: tl.constexpr,
            BLOCK_N: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BS: tl.constexpr, SPLITS: tl.constexpr,
            HKV: tl.constexpr, KEEP: tl.constexpr):
    b, h, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    length = tl.load(ranges + b)
    sinks = tl.load(ranges + n_rows + b)
    lo = tl.load(ranges + 2 * n_rows + b)
    visible_keys = sinks + length - lo
    per_split = tl.cdiv(tl.cdiv(visible_keys, SPLITS), BLOCK_N) * BLOCK_N
    j0 = split * per_split
    j1 = tl.minimum(j0 + per_split, visible_keys)
    rows = tl.arange(0, BLOCK_H)
    heads = h * G + rows
    dims = tl.arange(0, BLOCK_D)
    hmask, dmask = rows < G, dims < D
    qt = tl.load(q + b * s_qb + heads[:, None] * s_qh + dims[None, :], mask=hmask[:, None] & dmask[None, :],
                 other=0.0)
    m_i, l_i, acc = softmax_state(BLOCK_H, BLOCK_D)
    for j in range(j0, j1, BLOCK_N):
        idx = j + tl.arange(0, BLOCK_N)
        valid = idx < j1
        pos = tl.where(idx < sinks, idx, lo + idx - sinks)
        # Keys before the sinks' end: with a keep mask, only those this KV head kept.
        kt, vt, seen = load_kv_kept(k_cache, v_cache, keep, tables + b * s_tb, pos, valid, idx < sinks, h, s_kb,
                                    s_ks, s_kh, s_vb, s_vs, s_vh, dims, dmask, BS, HKV, KEEP)
        m_i, l_i, acc = attend_tile(qt, kt, vt, hmask[:, None] & seen[None, :], m_i, l_i, acc, scale)
    o, e = finish(m_i, l_i, acc)
    omask = hmask[:, None] & dmask[None, :]
    tl.store(out + b * s_ob + heads[:, None] * s_oh + split * s_os + dims[None, :], o, mask=omask)
    tl.store(lse + b * s_lb + heads * s_lh + split, e, mask=hmask)


def splits_for(rows: int, kv_heads: int, max_keys: int, device: torch.device) -> int:
    """Enough programs to fill the GPU twice over, a power of two, each split at least 256 keys."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = min(triton.cdiv(2 * sms, rows * kv_heads), max(1, max_keys // 256), 32)
    return 1 << (max(1, want).bit_length() - 1)


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                 ranges: torch.Tensor, max_keys: int, scale: float, splits: int | None = None,
                 block_n: int = 64, keep: torch.Tensor | None = None) -> torch.Tensor:
    """q `[B, H_q, D]`; tables `[B, N]` and ranges `[3, B]` (lengths, sinks, window starts) int32 on q's device;
    `keep` `[num_blocks, block_size, H_kv]` bool hides the keys before a row's sinks' end that a KV head did not
    keep."""
    b, hq, d = q.shape
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    g = hq // hkv
    splits = splits or splits_for(b, hkv, max_keys, q.device)
    out = torch.empty(b, hq, splits, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, hq, splits, dtype=torch.float32, device=q.device)
    _decode[(b, hkv, splits)](
        q, k_cache, v_cache, tables, ranges, ranges if keep is None else keep.contiguous(), out, lse, scale, b,
        q.stride(0), q.stride(1), *key_strides(k_cache), *key_strides(v_cache), tables.stride(0), out.stride(0),
        out.stride(1), out.stride(2), lse.stride(0), lse.stride(1), G=g, BLOCK_H=pow2(g), BLOCK_N=block_n, D=d,
        BLOCK_D=pow2(d), BS=bs, SPLITS=splits, HKV=hkv, KEEP=keep is not None)
    if splits == 1:
        return out[:, :, 0].to(q.dtype)
    merged, _ = merge_attention_states(out.permute(2, 0, 1, 3), lse.permute(2, 0, 1))
    return merged.to(q.dtype)
