"""Paged prefill over key ranges: one sequence's chunk of queries (the reference op for K2).

The query at position p sees key j iff j <= p and (j < sinks or (j >= lo and p - j < window)): without sinks,
lo and window that is dense causal attention (a chunk after cached context included); `sinks` + `window` is
SWAA's band with sink tokens; `sinks` = anchor and `lo` = its block's start is Star Attention's phase 1. The
plan, built once per step and shared by every layer, reads only the visible keys: the sink keys, then the
band from the first query's window start. With a window, queries run in tiles so that each tile reads its
own band, never the whole context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attention_backends.kernels.paged import gather_range, sdpa

TILE = 256  # queries per tile under a window: small enough that the band dominates, large enough for the fused kernel


@dataclass(frozen=True, slots=True)
class PrefillTile:
    """Query rows `[q0, q1)` over key columns `[0, sink_end)` and `[w0, w1)` of the plan's key list."""

    q0: int
    q1: int
    sink_end: int
    w0: int
    w1: int
    mask: torch.Tensor | None  # additive (0 or -inf): SDPA would convert a bool mask on every call
    causal: bool  # no mask: plain causal attention over the tile's keys, which start at its first query


@dataclass(frozen=True, slots=True)
class PrefillPlan:
    """The key list of a chunk of `length` queries from position `start`: positions `[0, sink_keys)` and
    `[band_lo, start + length)`; and each tile's columns of it."""

    start: int
    length: int
    sink_keys: int
    band_lo: int
    tiles: tuple[PrefillTile, ...]


def prefill_plan(start: int, length: int, *, sinks: int = 0, lo: int = 0, window: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> PrefillPlan:
    band_lo = max(lo, start - window + 1, 0) if window is not None else lo
    sink_keys = min(sinks, band_lo)
    positions = torch.cat([torch.arange(sink_keys), torch.arange(band_lo, start + length)])
    tile_rows = TILE if window is not None else length
    tiles = []
    for q0 in range(0, length, tile_rows):
        q1 = min(length, q0 + tile_rows)
        w0 = sink_keys
        if window is not None:  # the tile's first query's window start
            w0 = int(torch.searchsorted(positions, max(start + q0 - window + 1, band_lo)))
        w1 = sink_keys + (start + q1 - band_lo)  # keys up to the tile's last query
        sink_end = min(int(torch.searchsorted(positions, sinks)), w0)
        if sink_end == 0 and int(positions[w0]) == start + q0 and window is None:
            tiles.append(PrefillTile(q0, q1, 0, w0, w1, None, True))
            continue
        keys = torch.cat([positions[:sink_end], positions[w0:w1]])
        qpos = torch.arange(start + q0, start + q1).unsqueeze(1)
        visible = (keys <= qpos) & ((keys < sinks) | (keys >= lo))
        if window is not None:
            visible &= (qpos - keys < window) | (keys < sinks)
        mask = torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, float("-inf")).to(device)
        tiles.append(PrefillTile(q0, q1, sink_end, w0, w1, mask, False))
    return PrefillPlan(start, length, sink_keys, band_lo, tuple(tiles))


def paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                  plan: PrefillPlan, scale: float, fresh: tuple[torch.Tensor, torch.Tensor] | None = None
                  ) -> torch.Tensor:
    """q `[H_q, T, D]` at positions `plan.start..`, over its visible keys read through the block table (the
    chunk's own ones from `fresh` `[H_kv, T, D]`, when given: what the cache holds there) -> `[H_q, T, D]`."""
    end = plan.start + plan.length
    parts = []
    if plan.sink_keys:
        parts.append(gather_range(k_cache, v_cache, block_table, 0, plan.sink_keys))
    if fresh is None:
        parts.append(gather_range(k_cache, v_cache, block_table, plan.band_lo, end))
    else:
        if plan.band_lo < plan.start:
            parts.append(gather_range(k_cache, v_cache, block_table, plan.band_lo, plan.start))
        parts.append(fresh)
    keys, values = (torch.cat(x, dim=1) if len(x) > 1 else x[0] for x in zip(*parts))

    def attend(tile: PrefillTile) -> torch.Tensor:
        if tile.sink_end == tile.w0:
            kt, vt = keys[:, : tile.w1], values[:, : tile.w1]
        else:
            kt, vt = (torch.cat([t[:, : tile.sink_end], t[:, tile.w0 : tile.w1]], dim=1) for t in (keys, values))
        return sdpa(q[:, tile.q0 : tile.q1], kt, vt, scale, mask=tile.mask, causal=tile.causal)

    if len(plan.tiles) == 1:
        return attend(plan.tiles[0])
    out = torch.empty_like(q)
    for tile in plan.tiles:
        out[:, tile.q0 : tile.q1] = attend(tile)
    return out
