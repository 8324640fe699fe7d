"""LONGSERVE_INFLLM_V2: InfLLM-V2's dense-sparse switchable attention, with longserve's `infllm_v2` params.

Rows at positions before the switch attend exactly; later ones score every earlier selection block through
compressed keys and attend to their `topk + local_blocks` blocks, in prefill and decode alike
(`attention_backends.kernels.block_sparse`, the ops longserve's engine runs).

Where this differs from longserve's engine, and why:
- The switch is on position only: a row is sparse iff `position + 1 >= dense_len` (or past the first
  `topk + local_blocks` blocks, which it would see whole anyway). vLLM's backends are not told a request's prompt
  length, so a long prompt's leading rows stay dense here, where longserve makes the whole prompt sparse.
- The compressed keys pool per-block key means kept in a float32 table indexed by vLLM's block id, one per layer:
  a block's means are computed in the step whose tokens reach its last slot (the step's plan lists those blocks),
  after vLLM has written the layer's keys and before the layer attends, so a block that is freed and reused gets fresh
  means when it fills again, and a full block a prefix-cache hit shares was never rewritten. A block filled by a KV
  connector is not in any step's tokens and has no means: do not combine the two.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch
from vllm.config import get_current_vllm_config

from attention_backends.infllm_v2 import InfLLMV2Params
from attention_backends.kernels.block_sparse import SparsePlan, SparseRow, attend_block_sparse, page_means, sparse_plan
from attention_backends.kernels.ranges import RangeRow, RangeWork, attend_ranges, range_work
from longserve_vllm.backend import LongserveBackend, RangeImpl
from longserve_vllm.config import LongserveConfigError
from longserve_vllm.metadata import StepRow


@dataclass(frozen=True, slots=True)
class InfLLMWork:
    exact: RangeWork  # rows before the switch
    sparse: SparsePlan
    filled: torch.Tensor | None  # blocks whose last slot the step writes: their key means are taken first


class InfLLMV2Impl(RangeImpl):
    method = "infllm_v2"
    params: InfLLMV2Params

    def check_params(self) -> None:
        page = get_current_vllm_config().cache_config.block_size
        p = self.params
        if p.kernel_stride % page or p.block_size % page:
            raise LongserveConfigError(f"LONGSERVE_INFLLM_V2: kernel_stride and block_size must be multiples of the "
                                       f"KV cache block size ({page}), got {p.kernel_stride} and {p.block_size}")
        if self.own_window is not None:
            raise LongserveConfigError("LONGSERVE_INFLLM_V2 needs full-attention layers; this model has its own "
                                       "sliding window")
        self.selection = p.selection(page)
        self.first_sparse = p.first_sparse(None)
        self.means: dict[int, torch.Tensor] = {}  # per layer: [num_blocks, H_kv, D] key means of full blocks

    def plan(self, kind: Hashable, rows: list[StepRow], geometry: dict[str, Any]) -> InfLLMWork:
        exact, sparse = [], []
        for r in rows:
            n = min(max(self.first_sparse - r.start, 0), r.length)
            if n:
                exact.append(RangeRow(r.row, r.block_table, r.start, n))
            if n < r.length:
                sparse.append(SparseRow(r.row + n, r.block_table, r.start + n, r.length - n))
        # Block j's last slot, at position j * bs + bs - 1, is in [start, start + length) iff start // bs <= j <
        # (start + length) // bs.
        bs = geometry["block_size"]
        filled = torch.cat([r.block_table[r.start // bs : (r.start + r.length) // bs] for r in rows]
                           or [torch.zeros(0, dtype=torch.long)])
        return InfLLMWork(range_work(exact, **geometry), sparse_plan(sparse, self.selection, geometry["device"]),
                          filled.long().to(geometry["device"]) if filled.numel() else None)

    def attend(self, layer_index: int, out: torch.Tensor, q: torch.Tensor, k: torch.Tensor | None,
               v: torch.Tensor | None, k_cache: torch.Tensor, v_cache: torch.Tensor, work: InfLLMWork) -> None:
        means = self.means.get(layer_index)
        if means is None:
            means = self.means[layer_index] = k_cache.new_zeros(k_cache.shape[0], self.num_kv_heads, self.head_size,
                                                                dtype=torch.float32)
        if work.filled is not None:  # vLLM has written this layer's keys of the step
            means[work.filled] = page_means(k_cache, work.filled)
        attend_ranges(out, q, k, v, k_cache, v_cache, work.exact, self.scale)
        attend_block_sparse(out, q, k_cache, v_cache, means, work.sparse, self.selection, self.scale)


class InfLLMV2Backend(LongserveBackend):
    registered_name = "LONGSERVE_INFLLM_V2"
    impl_cls = InfLLMV2Impl
