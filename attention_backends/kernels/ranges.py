"""A step's attention over key ranges, planned once for every layer that shares a pattern, in either host.

Each sequence's rows see the keys `[0, sinks) ∪` a causal band from `lo` on (within `window` when given): dense
attention with neither, a model's own sliding window, SWAA's band with sink tokens, Star Attention's context block
behind its anchor. A one-query row is a decode whatever its phase (the visible keys are the same), so it joins the
step's batched decode; longer chunks go to the prefill batch. longserve's backends and the vLLM plugin both describe
their rows as `RangeRow`s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from attention_backends.kernels.decode import DecodePlan, decode_plan, paged_decode
from attention_backends.kernels.paged import row_index
from attention_backends.kernels.prefill import PrefillBatch, prefill_batch, prefill_into, prefill_plan


@dataclass(frozen=True, slots=True)
class RangeRow:
    """One sequence's rows `[row, row + length)` of the packed batch, at positions `[start, start + length)`."""

    row: int
    block_table: torch.Tensor
    start: int
    length: int
    sinks: int = 0
    window: int | None = None
    lo: int = 0  # the band's first key (Star Attention's context block)


@dataclass(frozen=True, slots=True)
class RangeWork:
    """The prefill chunks in one batch, and the decoding rows with their plan: windowed rows apart from full ones,
    so that a windowed row reads only its window's blocks."""

    prefill: PrefillBatch
    decode: tuple[tuple[torch.Tensor | slice, DecodePlan], ...]


def range_work(rows: Sequence[RangeRow], *, block_size: int, group: int, dtype: torch.dtype,
               device: torch.device | str, num_blocks: int) -> RangeWork:
    """Plan `rows` for the kernel that will run them; `group` is query heads per KV head."""
    chunks = [(r.row, r.block_table, prefill_plan(r.start, r.length, sinks=r.sinks, lo=r.lo, window=r.window,
                                                   dtype=dtype, device=device))
              for r in rows if r.length > 1]
    # One query's band from `lo` is a window reaching back to it.
    rows = [r if r.length > 1 or not r.lo else replace(r, window=min(r.window or r.start + 1, r.start + 1 - r.lo),
                                                        lo=0)
            for r in rows]
    decode = []
    for windowed in (False, True):
        dec = [r for r in rows if r.length == 1 and (r.window is not None) == windowed]
        if dec:
            plan = decode_plan([r.block_table for r in dec], [r.start + 1 for r in dec], block_size,
                               [r.sinks for r in dec], [r.window for r in dec], device, num_blocks)
            decode.append((row_index([r.row for r in dec]), plan))
    return RangeWork(prefill_batch(chunks, group, device, num_blocks), tuple(decode))


def attend_ranges(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, work: RangeWork, scale: float,
                  keep: torch.Tensor | None = None) -> None:
    """Rows of `out` `[H_q, T, D]` from `q`, over the cache; fresh `k`/`v` `[H_kv, T, D]` (what the cache holds at
    those rows, or None) spare the reference a read of a chunk's own keys. `keep` `[num_blocks, block_size, H_kv]`
    bool (TCA's kept tokens): a row's sink keys before its band are seen by a KV head's queries only where it holds."""
    prefill_into(out, q, k, v, k_cache, v_cache, work.prefill, scale, keep)
    for rows, plan in work.decode:
        out[:, rows] = paged_decode(q[:, rows].transpose(0, 1), k_cache, v_cache, plan, scale, keep).transpose(0, 1)
