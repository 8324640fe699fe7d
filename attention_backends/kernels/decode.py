"""Paged decode: one query per row over the keys its sequence shows it (the reference op for K1).

Row b sees the keys at positions `[0, sinks_b) ∪ [lo_b, L_b)` of its sequence, `lo_b = max(0, L_b - window_b)`:
every key without a window (dense), SWAA's windowed decode with sink tokens, a model's own sliding window.
The plan, built once per step and shared by every layer, lists for each row only the blocks holding visible
keys, so a windowed row reads O(sinks + window) keys however long its sequence is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from attention_backends.kernels.paged import sdpa, take_blocks


@dataclass(frozen=True, slots=True)
class DecodePlan:
    """The visible keys of B decoding rows: block tables `[B, N]` (padded with the null block) and which of their
    `N * block_size` keys each row sees (None: all)."""

    block_tables: torch.Tensor
    visible: torch.Tensor | None

    def take(self, rows: list[int]) -> DecodePlan:
        r = torch.tensor(rows)
        return DecodePlan(self.block_tables[r], None if self.visible is None else self.visible[r])


def decode_plan(block_tables: Sequence[torch.Tensor], seq_lens: Sequence[int], block_size: int,
                sinks: Sequence[int] | None = None, windows: Sequence[int | None] | None = None) -> DecodePlan:
    """Plan rows over their sequences' block tables, with per-row sink counts and windows (None: no window)."""
    bs, lens = block_size, torch.tensor(list(seq_lens))
    lo = torch.zeros_like(lens)
    if windows is not None:
        win = torch.tensor([-1 if w is None else w for w in windows])
        lo = torch.where(win >= 0, (lens - win).clamp_min(0), 0)
    sink = torch.minimum(torch.tensor(list(sinks)), lo) if sinks is not None else torch.zeros_like(lens)
    # Row b reads its sink blocks [0, head_b), then its blocks [first_b, last_b).
    head, last = (sink + bs - 1) // bs, (lens + bs - 1) // bs
    first = torch.maximum(head, lo // bs)
    count = head + last - first
    j = torch.arange(int(count.max()))
    index = torch.where(j < head[:, None], j, first[:, None] + j - head[:, None])
    used = j < count[:, None]
    full = torch.zeros(len(lens), int(last.max()), dtype=torch.long)
    for i, (table, n) in enumerate(zip(block_tables, last.tolist())):
        full[i, :n] = table[:n]
    tables = torch.where(used, full.gather(1, index.clamp_max(full.shape[1] - 1)), 0)
    pos = (index.unsqueeze(-1) * bs + torch.arange(bs)).flatten(1)
    visible = (used.repeat_interleave(bs, 1) & (pos < lens[:, None])
               & ((pos < sink[:, None]) | (pos >= lo[:, None])))
    return DecodePlan(tables, None if bool(visible.all()) else visible)


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: DecodePlan, scale: float
                 ) -> torch.Tensor:
    """q `[B, H_q, D]`, one query per row, over the keys its plan shows -> `[B, H_q, D]`."""
    k, v = (take_blocks(c, plan.block_tables).flatten(1, 2).transpose(1, 2) for c in (k_cache, v_cache))
    mask = None if plan.visible is None else plan.visible[:, None, None, :]
    return sdpa(q.unsqueeze(2), k, v, scale, mask=mask).squeeze(2)
