"""LONGSERVE_TCA, compute-only: TCA-Attention's per-head budgets and redundancy-based selection, with longserve's
`tca` params and calibration artifact, and every block kept in vLLM's cache.

When a block completes, its last query decides how many of its tokens each KV head keeps and which
(`attention_backends.tca.keep_masks`, longserve's rule); the masks are kept in a table indexed by vLLM's block id,
one per layer, and rewritten whenever the block completes again. Once a sequence holds `dense_len` tokens, a query
sees, per KV head, the kept tokens of the blocks behind its local window and every token from there on, the set
longserve's engine attends to after compacting: the kernel layer's attention over key ranges, the front as sink
keys under the mask (on the CPU the C++ kernels, reading vLLM's cache in place).
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

from attention_backends.kernels.ranges import RangeRow, RangeWork, attend_ranges, range_work
from attention_backends.tca import TCAParams, completed_blocks, frontier, keep_masks
from longserve_vllm.backend import LongserveBackend, RangeImpl
from longserve_vllm.config import LongserveConfigError
from longserve_vllm.metadata import StepRow


@dataclass(frozen=True, slots=True)
class TCAWork:
    rows: tuple[StepRow, ...]  # every row: the blocks it completes get their keep masks from its queries
    ranges: RangeWork  # each row over its front [0, frontier) as sink keys under the keep mask, whole from there on


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
        fronts = [frontier(r.start, geometry["block_size"], self.params) for r in rows]
        return TCAWork(tuple(rows), range_work([RangeRow(r.row, r.block_table, r.start, r.length, sinks=f, lo=f)
                                                for r, f in zip(rows, fronts)], **geometry))

    def attend(self, layer_index: int, out: torch.Tensor, q: torch.Tensor, k: torch.Tensor | None,
               v: torch.Tensor | None, k_cache: torch.Tensor, v_cache: torch.Tensor, work: TCAWork) -> None:
        num_blocks, bs, hkv = k_cache.shape[:3]
        if layer_index not in self.keep:
            self.keep[layer_index] = torch.ones(num_blocks, bs, hkv, dtype=torch.bool, device=k_cache.device)
        keep = self.keep[layer_index]
        for r in work.rows:
            blocks, last = completed_blocks(r.start, r.length, bs)
            if len(blocks):
                ids = r.block_table[blocks].to(k_cache.device)
                thresholds = self.thresholds[layer_index].to(k_cache.device)
                keep[ids] = keep_masks(q[:, r.row + last], k_cache[ids], thresholds, self.scale)
        attend_ranges(out, q, k, v, k_cache, v_cache, work.ranges, self.scale, keep)


class TCABackend(LongserveBackend):
    registered_name = "LONGSERVE_TCA"
    impl_cls = TCAImpl
