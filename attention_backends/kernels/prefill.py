"""Paged prefill over key ranges: one sequence's chunk of queries (the reference op for K2).

The query at position p sees key j iff j <= p and (j < sinks or (j >= lo and p - j < window)): without sinks,
lo and window that is dense causal attention (a chunk after cached context included); `sinks` + `window` is
SWAA's band with sink tokens; `sinks` = anchor and `lo` = its block's start is Star Attention's phase 1. The
plan, built once per step and shared by every layer, reads only the visible keys: the sink keys, then the
band from the first query's window start. With a window, queries run in tiles so that each tile reads its
own band, never the whole context. A step's chunks go together in a `PrefillBatch`, which the Triton kernel
(`triton_prefill.py`) runs in one launch; on the CPU the C++ kernel (`csrc/paged_prefill.cpp`) runs each chunk
over the cache in place, with the same visibility and no mask or gathered copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from attention_backends.kernels.dispatch import check_ids, use_cpp, use_triton
from attention_backends.kernels.merge import merge_attention_states
from attention_backends.kernels.paged import cdiv, check_keep, gather_range, padded_tables, sdpa, take_blocks

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
    causal: bool  # no mask: causal from the tile's first query (on the CPU, after cached context every query sees)


@dataclass(frozen=True, slots=True)
class PrefillPlan:
    """A chunk of `length` queries from position `start` and what they see (`sinks`, `lo`, `window`). The reference
    reads the key list positions `[0, sink_keys)` and `[band_lo, start + length)`, in `tiles` of it (none when a
    `kernel`, "triton" or "cpp", runs the chunk)."""

    start: int
    length: int
    sinks: int
    lo: int
    window: int | None
    sink_keys: int
    band_lo: int
    tiles: tuple[PrefillTile, ...]
    kernel: str | None = None


def prefill_plan(start: int, length: int, *, sinks: int = 0, lo: int = 0, window: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> PrefillPlan:
    if window is not None and window >= start + length:  # it covers every key: the same as none, planned as none
        window = None
    band_lo = max(lo, start - window + 1, 0) if window is not None else lo
    sink_keys = min(sinks, band_lo)
    for kernel, chosen in (("triton", use_triton), ("cpp", use_cpp)):
        if chosen(device):
            return PrefillPlan(start, length, sinks, lo, window, sink_keys, band_lo, (), kernel)
    positions = torch.cat([torch.arange(sink_keys), torch.arange(band_lo, start + length)])
    tile_rows = TILE if window is not None else length
    on_cpu = torch.device(device).type == "cpu"
    tiles = []
    for q0 in range(0, length, tile_rows):
        q1 = min(length, q0 + tile_rows)
        w0 = sink_keys
        if window is not None:  # the tile's first query's window start
            w0 = int(torch.searchsorted(positions, max(start + q0 - window + 1, band_lo)))
        w1 = sink_keys + (start + q1 - band_lo)  # keys up to the tile's last query
        sink_end = min(int(torch.searchsorted(positions, sinks)), w0)
        if sink_end == 0 and window is None and (int(positions[w0]) == start + q0 or on_cpu):
            # A chunk after cached context: the context unmasked, the chunk's own keys causal, merged by their
            # log-sum-exps (CPU: the fused kernel returns them), so no mask is built or read.
            tiles.append(PrefillTile(q0, q1, 0, w0, w1, None, True))
            continue
        keys = torch.cat([positions[:sink_end], positions[w0:w1]])
        qpos = torch.arange(start + q0, start + q1).unsqueeze(1)
        visible = (keys <= qpos) & ((keys < sinks) | (keys >= lo))
        if window is not None:
            visible &= (qpos - keys < window) | (keys < sinks)
        mask = torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, float("-inf")).to(device)
        tiles.append(PrefillTile(q0, q1, sink_end, w0, w1, mask, False))
    return PrefillPlan(start, length, sinks, lo, window, sink_keys, band_lo, tuple(tiles))


def paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                  plan: PrefillPlan, scale: float, fresh: tuple[torch.Tensor, torch.Tensor] | None = None,
                  keep: torch.Tensor | None = None) -> torch.Tensor:
    """q `[H_q, T, D]` at positions `plan.start..`, over its visible keys read through the block table (the
    chunk's own ones from `fresh` `[H_kv, T, D]`, when given: what the cache holds there) -> `[H_q, T, D]`. `keep`
    `[num_blocks, block_size, H_kv]` bool (TCA's kept tokens): a sink key before the band is seen by a KV head's
    queries only where it holds; the band is seen whole."""
    if plan.kernel is not None:
        out = torch.empty_like(q)
        batch = prefill_batch([(0, block_table, plan)], q.shape[0] // k_cache.shape[2], q.device)
        prefill_into(out, q, None, None, k_cache, v_cache, batch, scale, keep)
        return out
    end = plan.start + plan.length
    if plan.tiles[0].causal and plan.band_lo < plan.start:  # context and chunk read apart: no concatenation
        own = fresh if fresh is not None else gather_range(k_cache, v_cache, block_table, plan.start, end)
        return _context_then_causal(q, gather_range(k_cache, v_cache, block_table, plan.band_lo, plan.start), own,
                                   scale)
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
        mask = tile.mask
        if keep is not None and tile.sink_end:  # per KV head: its unkept sink keys hidden, for its query heads
            bs = k_cache.shape[1]
            kept = take_blocks(keep, block_table[: cdiv(tile.sink_end, bs)]).flatten(0, 1)[: tile.sink_end].T
            hidden = torch.zeros(kept.shape[0], 1, kt.shape[1], dtype=mask.dtype, device=mask.device)
            hidden[:, 0, : tile.sink_end].masked_fill_(~kept.to(mask.device), float("-inf"))
            mask = (mask + hidden).repeat_interleave(q.shape[0] // kt.shape[0], 0)
        return sdpa(q[:, tile.q0 : tile.q1], kt, vt, scale, mask=mask, causal=tile.causal)

    if len(plan.tiles) == 1:
        return attend(plan.tiles[0])
    out = torch.empty_like(q)
    for tile in plan.tiles:
        out[:, tile.q0 : tile.q1] = attend(tile)
    return out


def _context_then_causal(q: torch.Tensor, context: tuple[torch.Tensor, torch.Tensor],
                         own: tuple[torch.Tensor, torch.Tensor], scale: float) -> torch.Tensor:
    """q `[H_q, T, D]` over `context` keys it all sees and then its own `T` keys, causally: two fused attentions,
    merged exactly by their log-sum-exps."""
    hq, t, d = q.shape
    hkv = context[0].shape[0]
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

    def dense_last(x: torch.Tensor) -> torch.Tensor:  # the fused kernel reads D contiguous
        return x if x.stride(-1) == 1 else x.contiguous()

    # Every query sees every context key, so each KV head's G query heads go as one longer query: no K/V copy.
    ctx_out, ctx_lse = flash(q.reshape(1, hkv, -1, d), *(dense_last(x)[None] for x in context), 0.0, False,
                             scale=scale)
    # Causality holds per query head: the chunk's own (few) K/V repeated for the group.
    own_out, own_lse = flash(q[None], *(dense_last(x).repeat_interleave(hq // hkv, 0)[None] for x in own), 0.0, True,
                             scale=scale)
    merged, _ = merge_attention_states(torch.stack([ctx_out.reshape(hq, t, d), own_out[0]]),
                                       torch.stack([ctx_lse.reshape(hq, t), own_lse[0]]))
    return merged.to(q.dtype)


@dataclass(frozen=True, slots=True)
class PrefillBatch:
    """A step's chunks: (first row in the packed batch, block table, plan) each; and, for the Triton kernel, the
    same as int32 tensors on the cache's device (tables `[C, N]`, chunks `[6, C]`, tiles `[2, n]`)."""

    chunks: list[tuple[int, torch.Tensor, PrefillPlan]]
    triton: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


def prefill_batch(chunks: Sequence[tuple[int, torch.Tensor, PrefillPlan]], group: int,
                  device: torch.device | str = "cpu", num_blocks: int | None = None) -> PrefillBatch:
    """Chunks attended together; `group` is the model's query heads per KV head (it sets the Triton tile)."""
    chunks = list(chunks)
    if not chunks or chunks[0][2].kernel != "triton":
        # The C++ kernel reads int32 block ids; converted once here, not at every layer.
        return PrefillBatch([(row, table.to(torch.int32).contiguous() if plan.kernel == "cpp" else table, plan)
                             for row, table, plan in chunks])
    from attention_backends.kernels.triton_prefill import block_q

    tables = padded_tables([table for _, table, _ in chunks])
    if num_blocks is not None:
        check_ids(tables, num_blocks, "block ids")
    rows = torch.tensor([[row, p.start, p.length, p.sinks, p.lo, -1 if p.window is None else p.window]
                         for row, _, p in chunks]).T
    bq = block_q(group)
    tiles = torch.tensor([(i, q0) for i, (_, _, p) in enumerate(chunks) for q0 in range(0, p.length, bq)]).T
    return PrefillBatch(chunks, tuple(t.to(device, torch.int32).contiguous() for t in (tables, rows, tiles)))


def prefill_into(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
                 k_cache: torch.Tensor, v_cache: torch.Tensor, batch: PrefillBatch, scale: float,
                 keep: torch.Tensor | None = None) -> None:
    """Each chunk's rows of `out` `[H_q, T, D]` from `q`; fresh `k`/`v` `[H_kv, T, D]` (what the cache holds at those
    rows) spare the reference a read of the chunk's own keys; `keep` as in `paged_prefill`."""
    check_keep(keep, k_cache)
    if batch.triton is not None:
        from attention_backends.kernels import triton_prefill

        triton_prefill.prefill_into(out, q, k_cache, v_cache, *batch.triton, scale, keep=keep)
        return
    for row, table, plan in batch.chunks:
        rows = slice(row, row + plan.length)
        if plan.kernel == "cpp":
            from attention_backends.kernels import cpu_ext

            window = -1 if plan.window is None else plan.window
            cpu_ext.load().paged_prefill(out[:, rows], q[:, rows], k_cache, v_cache, table, plan.start, plan.sinks,
                                         plan.lo, window, scale, None if keep is None else keep.contiguous())
            continue
        fresh = None if k is None else (k[:, rows], v[:, rows])
        out[:, rows] = paged_prefill(q[:, rows], k_cache, v_cache, table, plan, scale, fresh, keep)
