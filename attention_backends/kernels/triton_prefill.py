"""Triton K2: paged prefill over key ranges, the kernel beside `prefill.paged_prefill`, every chunk of a step in one
launch.

Grid (tile, KV head); a tile is `BLOCK_Q` queries of one chunk, packed with the query heads of a KV group into
`BLOCK_M` rows, so each K/V tile is loaded once per KV head. It reads the chunk's sink keys `[0, min(sinks, w))`,
then its band `[w, last query]`, where w is the tile's first query's window start (or `lo`), causal, windowed and
with the sinks visible, all through the block table: the chunk's own K/V are already in the cache.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attention_backends.kernels.triton_common import (
    attend_tile,
    finish,
    key_strides,
    load_kv,
    load_kv_kept,
    pow2,
    softmax_state,
)

BLOCK_M = 64  # rows per program: queries x the heads of a KV group
BLOCK_N = 32  # keys per tile


@triton.jit
def _prefill(q, k_cache, v_cache, out, tables, chunks, tiles, keep, scale, n_chunks, n_tiles, s_qh, s_qt, s_oh, s_ot,
             s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_tb, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
             BLOCK_N: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BS: tl.constexpr, HKV: tl.constexpr,
             KEEP: tl.constexpr):
    tile, h = tl.program_id(0), tl.program_id(1)
    c = tl.load(tiles + tile)
    q0 = tl.load(tiles + n_tiles + tile)
    row0 = tl.load(chunks + c)
    start = tl.load(chunks + n_chunks + c)
    length = tl.load(chunks + 2 * n_chunks + c)
    sinks = tl.load(chunks + 3 * n_chunks + c)
    lo = tl.load(chunks + 4 * n_chunks + c)
    window = tl.load(chunks + 5 * n_chunks + c)  # -1: none
    r = tl.arange(0, BLOCK_M)
    t = q0 + r // G
    head = h * G + r % G
    rmask = (r < BLOCK_Q * G) & (t < length)
    qpos = start + t
    dims = tl.arange(0, BLOCK_D)
    dmask = dims < D
    qt = tl.load(q + head[:, None] * s_qh + (row0 + t)[:, None] * s_qt + dims[None, :],
                 mask=rmask[:, None] & dmask[None, :], other=0.0)
    first = start + q0
    last = start + tl.minimum(q0 + BLOCK_Q, length) - 1
    w = tl.where(window >= 0, tl.maximum(tl.maximum(lo, first - window + 1), 0), lo)
    sink_end = tl.minimum(sinks, w)
    table = tables + c * s_tb
    m_i, l_i, acc = softmax_state(BLOCK_M, BLOCK_D)
    for j in range(0, sink_end, BLOCK_N):  # sink (or anchor) keys: before every query, visible to all
        idx = j + tl.arange(0, BLOCK_N)
        valid = idx < sink_end
        # With a keep mask, only the sink keys this KV head kept.
        kt, vt, seen = load_kv_kept(k_cache, v_cache, keep, table, idx, valid, valid, h, s_kb, s_ks, s_kh, s_vb, s_vs,
                                    s_vh, dims, dmask, BS, HKV, KEEP)
        m_i, l_i, acc = attend_tile(qt, kt, vt, rmask[:, None] & seen[None, :], m_i, l_i, acc, scale)
    for j in range(w, last + 1, BLOCK_N):  # the band: causal, from lo, inside the window unless a sink
        idx = j + tl.arange(0, BLOCK_N)
        valid = idx <= last
        kt, vt = load_kv(k_cache, v_cache, table, idx, valid, h, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, dims, dmask, BS)
        key, qp = idx[None, :], qpos[:, None]
        seen = (key <= qp) & (key >= lo) & ((window < 0) | (qp - key < window) | (key < sinks))
        m_i, l_i, acc = attend_tile(qt, kt, vt, rmask[:, None] & valid[None, :] & seen, m_i, l_i, acc, scale)
    o, _ = finish(m_i, l_i, acc)
    tl.store(out + head[:, None] * s_oh + (row0 + t)[:, None] * s_ot + dims[None, :], o.to(out.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])


def block_q(group: int) -> int:
    """Queries per tile: as many as fill `BLOCK_M` rows with their KV group's heads."""
    return max(1, BLOCK_M // group)


def prefill_into(out: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 tables: torch.Tensor, chunks: torch.Tensor, tiles: torch.Tensor, scale: float,
                 keep: torch.Tensor | None = None) -> None:
    """q and out `[H_q, T, D]` (packed rows of the step); tables `[C, N]`, chunks `[6, C]` (first row, start, length,
    sinks, lo, window or -1) and tiles `[2, n]` (chunk, first query), int32 on q's device; `keep` `[num_blocks,
    block_size, H_kv]` bool hides the sink keys a KV head did not keep."""
    hq, _, d = q.shape
    hkv, bs = k_cache.shape[2], k_cache.shape[1]
    g = hq // hkv
    n_tiles = tiles.shape[1]
    if not n_tiles:
        return
    _prefill[(n_tiles, hkv)](q, k_cache, v_cache, out, tables, chunks, tiles,
                             chunks if keep is None else keep.contiguous(), scale, chunks.shape[1], n_tiles,
                             q.stride(0), q.stride(1), out.stride(0), out.stride(1), *key_strides(k_cache),
                             *key_strides(v_cache), tables.stride(0), G=g, BLOCK_M=pow2(g * block_q(g)),
                             BLOCK_Q=block_q(g), BLOCK_N=BLOCK_N, D=d, BLOCK_D=pow2(d), BS=bs, HKV=hkv,
                             KEEP=keep is not None)
