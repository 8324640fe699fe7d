"""LONGSERVE_TCA, compute-only: TCA-Attention's per-head budgets and redundancy-based selection, with longserve's
`tca` params and calibration artifact, and every block kept in vLLM's cache.

When a block completes, its last query decides how many of its tokens each KV head keeps and which
(`attention_backends.tca.keep_masks`, longserve's rule); the masks are kept in a table indexed by vLLM's block id,
one per layer, and rewritten whenever the block completes again. Once a sequence holds `dense_len` tokens, a query
sees, per KV head, the kept tokens of the blocks behind its local window and every token from there on, the set
longserve's engine attends to after compacting. A decode runs the kernel layer's paged decode with the mask (the
C++ kernel on the CPU, reading the cache in place); prefill chunks gather their context and mask it, tile by tile.
The memory saving is not here: vLLM's page holds all KV heads of a layer, and its scheduler, which alone frees
blocks, never sees attention scores; longserve's engine gives the evicted tokens' blocks back to its pool. Keep
masks are decided by a request's own queries, so prefix caching is refused, as longserve's engine keeps TCA
requests out of its prefix cache.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch
from vllm.config import get_current_vllm_config

from attention_backends.kernels.decode import DecodePlan, decode_plan, paged_decode
from attention_backends.kernels.paged import cdiv, gather_range, row_index, sdpa
from attention_backends.tca import TILE, TCAParams, completed_blocks, frontier, keep_masks
from longserve_vllm.backend import LongserveBackend, RangeImpl
from longserve_vllm.config import LongserveConfigError
from longserve_vllm.metadata import StepRow


@dataclass(frozen=True, slots=True)
class TCAWork:
    rows: tuple[StepRow, ...]  # every row: the blocks it completes get their keep masks from its queries
    chunks: tuple[StepRow, ...]  # rows of more than one query, attended tile by tile
    decode_rows: torch.Tensor | slice  # decodes (`row_index`): the kernel layer's paged decode with the keep mask
    decode: DecodePlan | None  # their front [0, frontier) under the mask, the band from the frontier whole


class TCAImpl(RangeImpl):
    method = "tca"
    params: TCAParams

    def check_params(self) -> None:
        config = get_current_vllm_config()
        if config.cache_config.enable_prefix_caching:
            raise LongserveConfigError("LONGSERVE_TCA's keep masks are decided by each request's own queries, which "
                                       "prefix caching would share: serve with --no-enable-prefix-caching")
        if self.own_window is not None:
            raise LongserveConfigError("LONGSERVE_TCA does not serve models with sliding-window layers")
        page = config.cache_config.block_size
        thresholds = self.artifact("LONGSERVE_TCA")["thresholds"]
        want = (self.num_layers, self.num_kv_heads, page.bit_length() - 1)
        if tuple(thresholds.shape) != want:
            raise LongserveConfigError(f"the TCA artifact's thresholds are {tuple(thresholds.shape)}; {page}-token "
                                       f"blocks without tensor parallelism need {want}: calibrate with longserve's "
                                       f"engine at --block-size {page}")
        self.thresholds = thresholds.float()
        self.keep: dict[int, torch.Tensor] = {}  # per layer: [num_blocks, block_size, H_kv], kept tokens

    def plan(self, kind: Hashable, rows: list[StepRow], geometry: dict[str, Any]) -> TCAWork:
        bs = geometry["block_size"]
        decodes = [r for r in rows if r.length == 1]
        fronts = [frontier(r.start, bs, self.params) for r in decodes]
        plan = decode_plan([r.block_table for r in decodes], [r.start + 1 for r in decodes], bs, fronts,
                           [r.start + 1 - f for r, f in zip(decodes, fronts)], geometry["device"]) if decodes else None
        return TCAWork(tuple(rows), tuple(r for r in rows if r.length > 1), row_index([r.row for r in decodes]), plan)

    def attend(self, layer_index: int, out: torch.Tensor, q: torch.Tensor, k: torch.Tensor | None,
               v: torch.Tensor | None, k_cache: torch.Tensor, v_cache: torch.Tensor, work: TCAWork) -> None:
        num_blocks, bs, hkv = k_cache.shape[:3]
        if layer_index not in self.keep:
            self.keep[layer_index] = torch.ones(num_blocks, bs, hkv, dtype=torch.bool, device=k_cache.device)
        keep, group = self.keep[layer_index], self.num_heads // self.num_kv_heads
        for r in work.rows:
            blocks, last = completed_blocks(r.start, r.length, bs)
            if len(blocks):
                ids = r.block_table[blocks].to(k_cache.device)
                thresholds = self.thresholds[layer_index].to(k_cache.device)
                keep[ids] = keep_masks(q[:, r.row + last], k_cache[ids], thresholds, self.scale)
        if work.decode is not None:
            rows = work.decode_rows
            out[:, rows] = paged_decode(q[:, rows].transpose(0, 1), k_cache, v_cache, work.decode, self.scale,
                                        keep).transpose(0, 1)
        for r in work.chunks:
            first = frontier(r.start, bs, self.params)
            for t0 in range(0, r.length, TILE):
                n, pos = min(TILE, r.length - t0), r.start + t0
                keys, values = gather_range(k_cache, v_cache, r.block_table, 0, pos + n)
                kept = keep[r.block_table[: cdiv(first, bs)].to(k_cache.device)].flatten(0, 1)[:first].T  # [H_kv, F]
                causal = torch.arange(first, pos + n) <= torch.arange(pos, pos + n).unsqueeze(1)  # [n, L - F]
                recent = causal.to(kept.device)
                mask = torch.cat([kept.unsqueeze(1).expand(-1, n, -1), recent.expand(hkv, -1, -1)], -1)
                rows = slice(r.row + t0, r.row + t0 + n)
                out[:, rows] = sdpa(q[:, rows], keys, values, self.scale, mask=mask.repeat_interleave(group, 0))


class TCABackend(LongserveBackend):
    registered_name = "LONGSERVE_TCA"
    impl_cls = TCAImpl
