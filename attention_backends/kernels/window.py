"""Sliding window with sink tokens over the paged cache: banded prefill and windowed decode.

Visibility: key j is visible to query i iff j <= i and (i - j < window or j < sinks). Prefill works in
query tiles; each tile reads its sink keys and the keys inside its window only, so the work per query is
O(sinks + window + tile), never O(context).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attention_backends.context import SeqStep
from attention_backends.kernels.paged import gather_range, sdpa
from kv_cache.paged_kv import PagedKVCache

TILE = 256  # queries per tile: small enough that the band dominates, large enough for the fused kernel


@dataclass(frozen=True, slots=True)
class Tile:
    q0: int  # query rows [q0, q1) of the chunk
    q1: int
    sink_end: int  # key columns [0, sink_end) and [w0, w1) of the chunk's key list
    w0: int
    w1: int
    mask: torch.Tensor  # [q1 - q0, sink_end + w1 - w0], additive (0 or -inf): SDPA converts a bool mask per call


@dataclass(frozen=True, slots=True)
class BandPlan:
    """Which cached positions a prefill chunk reads, and each tile's keys and mask: the same for every layer."""

    cached_sinks: int  # cached positions [0, cached_sinks) ...
    lo: int  # ... and [lo, num_cached) come from the cache, then the chunk's own keys
    tiles: list[Tile]


def band_plan(seq: SeqStep, window: int, sinks: int, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> BandPlan:
    c, t = seq.num_cached, seq.query_len
    lo = max(0, c - window + 1)  # the first query's window start
    cached_sinks = min(sinks, lo)
    positions = torch.cat([torch.arange(cached_sinks), torch.arange(lo, c + t)])
    tiles = []
    for q0 in range(0, t, TILE):
        q1 = min(t, q0 + TILE)
        start = c + q0 - window + 1  # the tile's first query's window start
        w0 = int(torch.searchsorted(positions, max(start, 0)))
        w1 = cached_sinks + (c + q1 - lo)  # keys up to the tile's last query
        sink_end = min(int(torch.searchsorted(positions, sinks)), w0)
        keys = torch.cat([positions[:sink_end], positions[w0:w1]])
        qpos = torch.arange(c + q0, c + q1).unsqueeze(1)
        visible = (keys <= qpos) & ((qpos - keys < window) | (keys < sinks))
        mask = torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, float("-inf")).to(device)
        tiles.append(Tile(q0, q1, sink_end, w0, w1, mask))
    return BandPlan(cached_sinks, lo, tiles)


def band_prefill_attention(kv: PagedKVCache, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           seq: SeqStep, plan: BandPlan, scale: float) -> torch.Tensor:
    """One sequence's prefill chunk, q `[H_q, T, D]` with its fresh k/v `[H_kv, T, D]`."""
    ks, vs = [k], [v]
    if seq.num_cached > plan.lo:
        kc, vc = gather_range(kv, layer, seq.block_table, plan.lo, seq.num_cached)
        ks.insert(0, kc)
        vs.insert(0, vc)
    if plan.cached_sinks:
        kc, vc = gather_range(kv, layer, seq.block_table, 0, plan.cached_sinks)
        ks.insert(0, kc)
        vs.insert(0, vc)
    keys, values = (torch.cat(x, dim=1) if len(x) > 1 else x[0] for x in (ks, vs))
    out = torch.empty_like(q)
    for tile in plan.tiles:
        kt = torch.cat([keys[:, : tile.sink_end], keys[:, tile.w0 : tile.w1]], dim=1)
        vt = torch.cat([values[:, : tile.sink_end], values[:, tile.w0 : tile.w1]], dim=1)
        out[:, tile.q0 : tile.q1] = sdpa(q[:, tile.q0 : tile.q1], kt, vt, scale, mask=tile.mask)
    return out


def window_block_tables(seqs: list[SeqStep], block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For decoding sequences: block tables `[B, N]` holding only each one's sink blocks and window blocks
    (padded with the null block), and the valid-key mask `[B, N * block_size]` of its one query."""
    rows, masks = [], []
    for s in seqs:
        p, length = s.params, s.context_len
        query = length - 1
        sink_blocks = -(-min(p.sinks, length) // block_size)
        first = max(sink_blocks, max(0, query - p.window + 1) // block_size)
        blocks = list(range(sink_blocks)) + list(range(first, -(-length // block_size)))
        pos = (torch.tensor(blocks).unsqueeze(1) * block_size + torch.arange(block_size)).flatten()
        rows.append(s.block_table[blocks])
        masks.append((pos <= query) & ((query - pos < p.window) | (pos < p.sinks)))
    n = max(len(r) for r in rows)
    tables = torch.zeros(len(rows), n, dtype=torch.long)
    valid = torch.zeros(len(rows), n * block_size, dtype=torch.bool)
    for i, (r, m) in enumerate(zip(rows, masks)):
        tables[i, : len(r)] = r
        valid[i, : m.numel()] = m
    return tables, valid
