"""Paged decode: one query per row over the keys its sequence shows it (the reference op for K1).

Row b sees the keys at positions `[0, sinks_b) ∪ [lo_b, L_b)` of its sequence, `lo_b = max(0, L_b - window_b)`:
every key without a window (dense), SWAA's windowed decode with sink tokens, a model's own sliding window.
The plan is built once per step, for every layer, in the form the op that will run reads: for the reference,
only the blocks holding visible keys and a visible mask, so a windowed row reads O(sinks + window) keys however
long its sequence is; for the Triton kernel (`triton_decode.py`) and the C++ CPU kernel (`csrc/paged_decode.cpp`,
which reads K/V where they lie, no copy of the context), the whole tables and the three ranges, int32 on the
cache's device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from attention_backends.kernels.dispatch import check_ids, use_cpp, use_triton
from attention_backends.kernels.paged import cdiv, check_keep, padded_tables, sdpa, take_blocks


@dataclass(frozen=True, slots=True)
class DecodePlan:
    """Reference form: block tables `[B, N]` of the visible keys' blocks, which of their `N * block_size` keys each
    row sees (None: all) and which of them lie before its sinks' end (`front`, for a keep mask). Kernel form (`kernel`
    "triton" or "cpp"): `ranges` `[3, B]` (lengths, sinks, window starts) over whole tables; the C++ kernel also
    takes a table per row and KV head, `[B, H_kv, N]`."""

    block_tables: torch.Tensor
    visible: torch.Tensor | None = None
    front: torch.Tensor | None = None
    ranges: torch.Tensor | None = None
    max_keys: int = 0  # the most keys a row sees (Triton: how finely to split)
    kernel: str = "torch"


def decode_plan(block_tables: Sequence[torch.Tensor], seq_lens: Sequence[int], block_size: int,
                sinks: Sequence[int] | None = None, windows: Sequence[int | None] | None = None,
                device: torch.device | str = "cpu", num_blocks: int | None = None) -> DecodePlan:
    """Plan rows over their sequences' block tables, with per-row sink counts and windows (None: no window)."""
    # In Python numbers, then one tensor each: a step's plan is built once, but right after the model's weights have
    # gone through the caches, where each small torch op costs several times what it costs in a loop.
    bs, n_rows = block_size, len(seq_lens)
    lens = [int(n) for n in seq_lens]
    los = [0 if w is None or w < 0 else max(0, n - w) for n, w in zip(lens, windows or [None] * n_rows)]
    sinks = [min(int(s), lo) for s, lo in zip(sinks or [0] * n_rows, los)]
    row_tables = [table[: cdiv(n, bs)] for table, n in zip(block_tables, lens)]
    kernel = "triton" if use_triton(device) else "cpp" if use_cpp(device) else None
    if kernel is not None:
        full = padded_tables(row_tables, torch.int32)
        if num_blocks is not None:
            check_ids(full, num_blocks, "block ids")
        return DecodePlan(full.to(device), ranges=torch.tensor([lens, sinks, los], dtype=torch.int32).to(device),
                          max_keys=max(s + n - lo for s, n, lo in zip(sinks, lens, los)), kernel=kernel)
    full = padded_tables(row_tables)
    lens, sink, lo = (torch.tensor(x) for x in (lens, sinks, los))
    last = (lens + bs - 1) // bs
    # Row b reads its sink blocks [0, head_b), then its blocks [first_b, last_b).
    head = (sink + bs - 1) // bs
    first = torch.maximum(head, lo // bs)
    count = head + last - first
    j = torch.arange(int(count.max()))
    index = torch.where(j < head[:, None], j, first[:, None] + j - head[:, None])
    used = j < count[:, None]
    tables = torch.where(used, full.gather(1, index.clamp_max(full.shape[1] - 1)), 0)
    pos = (index.unsqueeze(-1) * bs + torch.arange(bs)).flatten(1)
    listed = used.repeat_interleave(bs, 1)
    visible = listed & (pos < lens[:, None]) & ((pos < sink[:, None]) | (pos >= lo[:, None]))
    return DecodePlan(tables, None if bool(visible.all()) else visible, listed & (pos < sink[:, None]))


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: DecodePlan, scale: float,
                 keep: torch.Tensor | None = None) -> torch.Tensor:
    """q `[B, H_q, D]`, one query per row, over the keys its plan shows -> `[B, H_q, D]`. `keep` `[num_blocks,
    block_size, H_kv]` bool (TCA's kept tokens): a key before its row's sinks' end is seen by a KV head's queries only
    where it holds; the band from the window's start is seen whole."""
    check_keep(keep, k_cache)
    if plan.kernel == "cpp":
        from attention_backends.kernels import cpu_ext

        return cpu_ext.load().paged_decode(q.contiguous(), k_cache, v_cache, plan.block_tables, plan.ranges, scale,
                                           None if keep is None else keep.contiguous())
    if plan.kernel == "triton":
        from attention_backends.kernels import triton_decode

        return triton_decode.paged_decode(q, k_cache, v_cache, plan.block_tables, plan.ranges, plan.max_keys, scale,
                                          keep=keep)
    k, v = (take_blocks(c, plan.block_tables).flatten(1, 2).transpose(1, 2) for c in (k_cache, v_cache))
    mask = None if plan.visible is None else plan.visible[:, None, None, :]
    if keep is not None:  # [B, H_kv, L]: what each KV head sees, then repeated for its query heads
        hidden = plan.front[:, None, :] & ~take_blocks(keep, plan.block_tables).flatten(1, 2).transpose(1, 2)
        seen = ~hidden if plan.visible is None else plan.visible[:, None, :] & ~hidden
        mask = seen.repeat_interleave(q.shape[1] // k_cache.shape[2], 1).unsqueeze(2)
    return sdpa(q.unsqueeze(2), k, v, scale, mask=mask).squeeze(2)
