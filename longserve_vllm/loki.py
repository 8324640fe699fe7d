"""LONGSERVE_LOKI: Loki's low-rank key scoring, with longserve's `loki` params and calibration artifact.

Keys are rotated into the artifact's per-(layer, KV head) PCA basis before vLLM's writer stores them, and queries
alike in `forward`, so exact attention over the cache is unchanged. Prefill is exact; a decode whose context
reaches `dense_len` scores every cached key on the first d rotated channels (read where the cache holds them),
keeps the top `k_frac` with the sinks and the local window, and attends exactly to those, as longserve's engine
does (`attention_backends.kernels.topk`). The artifact is longserve's (`longserve calibrate --backend loki`, see
`RangeImpl.artifact`); the rotation changes what the
cache holds, so every host sharing a prefix cache or KV transfers must run the same artifact.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch
from vllm.config import get_current_vllm_config

from attention_backends.kernels.paged import cdiv, take_blocks
from attention_backends.kernels.ranges import RangeRow, RangeWork, attend_ranges, range_work
from attention_backends.kernels.slots import slot_attention
from attention_backends.kernels.topk import keep_top, lowrank_scores
from attention_backends.loki import LokiParams
from longserve_vllm.backend import LongserveBackend, RangeImpl
from longserve_vllm.config import LongserveConfigError
from longserve_vllm.metadata import StepRow


@dataclass(frozen=True, slots=True)
class LokiWork:
    exact: RangeWork  # prefill chunks, and decodes under the dense floor
    topk: tuple[StepRow, ...]  # decodes that keep their top keys


class LokiImpl(RangeImpl):
    method = "loki"
    params: LokiParams

    def check_params(self) -> None:
        p = self.params
        if p.prefill != "dense":
            raise LongserveConfigError('LONGSERVE_LOKI runs prefill exactly; "prefill": "topk" is longserve\'s own')
        if self.own_window is not None:
            raise LongserveConfigError("LONGSERVE_LOKI does not serve models with sliding-window layers")
        comps = self.artifact("LONGSERVE_LOKI")["components"]
        want = (self.num_layers, self.num_kv_heads, self.head_size, self.head_size)
        if tuple(comps.shape) != want:  # tensor parallelism shards KV heads; the artifact holds them all
            raise LongserveConfigError(f"the Loki artifact's components are {tuple(comps.shape)}; this layer needs "
                                       f"{want} (LONGSERVE_LOKI runs without tensor parallelism)")
        self.key_basis = comps.to(get_current_vllm_config().model_config.dtype)
        self.query_basis = self.key_basis.repeat_interleave(self.num_heads // self.num_kv_heads, 1)
        self.rank = p.rank(self.head_size)

    def plan(self, kind: Hashable, rows: list[StepRow], geometry: dict[str, Any]) -> LokiWork:
        def scored(r: StepRow) -> bool:  # a decode at or past the floor; a step under it is dense's own
            return r.length == 1 and not r.prefilling and r.start + 1 >= self.params.dense_len

        exact = [RangeRow(r.row, r.block_table, r.start, r.length) for r in rows if not scored(r)]
        return LokiWork(range_work(exact, **geometry), tuple(r for r in rows if scored(r)))

    def do_kv_cache_update(self, layer: torch.nn.Module, key: torch.Tensor, value: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        basis = self.key_basis[self.layer(layer.layer_name)[0]]
        rotated = (key.transpose(0, 1) @ basis.transpose(1, 2)).transpose(0, 1).contiguous()
        super().do_kv_cache_update(layer, rotated, value, kv_cache, slot_mapping)

    def attend(self, layer_index: int, out: torch.Tensor, q: torch.Tensor, k: torch.Tensor | None,
               v: torch.Tensor | None, k_cache: torch.Tensor, v_cache: torch.Tensor, work: LokiWork) -> None:
        qr = q @ self.query_basis[layer_index].transpose(1, 2)
        kr = None if k is None else k @ self.key_basis[layer_index].transpose(1, 2)
        attend_ranges(out, qr, kr, v, k_cache, v_cache, work.exact, self.scale)
        p, bs = self.params, k_cache.shape[1]
        for r in work.topk:
            length = r.start + 1
            table = r.block_table[: cdiv(length, bs)].to(k_cache.device)
            # Only the first d channels are read: on the CPU cache they are d whole rows of each block's keys.
            low = take_blocks(k_cache[..., : self.rank], table).flatten(0, 1)[:length]  # [L, H_kv, d]
            rows = qr[:, r.row : r.row + 1]
            indices, visible = keep_top(lowrank_scores(rows, low, per_group=p.selection == "group"), r.start,
                                        sinks=p.sinks, local_window=p.local_window, k_frac=p.k_frac,
                                        min_keep=p.min_keep, dense_len=p.dense_len)
            slots = table[indices // bs] * bs + indices % bs
            out[:, r.row : r.row + 1] = slot_attention(rows, k_cache, v_cache, slots, visible, self.scale)


class LokiBackend(LongserveBackend):
    registered_name = "LONGSERVE_LOKI"
    impl_cls = LokiImpl
