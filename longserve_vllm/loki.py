"""LONGSERVE_LOKI: Loki's low-rank key scoring, with longserve's `loki` params and calibration artifact.

Keys are rotated into the artifact's per-(layer, KV head) PCA basis as they are stored, and queries alike in
`forward`, so exact attention over the cache is unchanged. On the CPU the impl stores its pages itself, keys row by
row like the values (vLLM's writer would store them transposed, and a decode reads a quarter of them, scattered);
on CUDA vLLM's writer stores them. Prefill is exact; a decode whose context reaches `dense_len` scores every cached
key on the first d rotated channels (read where the cache holds them), keeps the top `k_frac` with the sinks and the
local window, and attends exactly to those, in the same kernel-layer op as longserve's engine
(`attention_backends.kernels.topk.lowrank_topk_decode`). The artifact is longserve's (`longserve calibrate --backend
loki`, see `RangeImpl.artifact`); the rotation changes what the cache holds, so every host sharing a prefix cache or
KV transfers must run the same artifact.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch
from vllm.config import get_current_vllm_config

from attention_backends.kernels.paged import row_index, write_kv
from attention_backends.kernels.ranges import RangeRow, RangeWork, attend_ranges, range_work
from attention_backends.kernels.topk import TopkDecodePlan, lowrank_topk_decode, topk_decode_plan
from attention_backends.loki import LokiParams
from longserve_vllm.backend import LongserveBackend, RangeImpl
from longserve_vllm.config import LongserveConfigError
from longserve_vllm.layout import ROWS
from longserve_vllm.metadata import StepRow
from longserve_vllm.platform_backend import ON_CPU


@dataclass(frozen=True, slots=True)
class LokiWork:
    exact: RangeWork | None  # prefill chunks, and decodes under the dense floor (None: no such row)
    topk_rows: torch.Tensor | slice  # rows of decodes that keep their top keys (`row_index`)
    topk: TopkDecodePlan | None


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
        # Per layer, what rotates `[H_kv, rows, D]` by one batched product: each KV head's basis, transposed.
        self.rotation = list(comps.to(get_current_vllm_config().model_config.dtype).transpose(-1, -2).contiguous())
        self.rank = p.rank(self.head_size)
        self.sets = self.num_kv_heads if p.selection == "group" else self.num_heads  # key sets a decode keeps

    def plan(self, kind: Hashable, rows: list[StepRow], geometry: dict[str, Any]) -> LokiWork:
        def scored(r: StepRow) -> bool:  # a decode at or past the floor; a step under it is dense's own
            return r.length == 1 and not r.prefilling and r.start + 1 >= self.params.dense_len

        exact = [RangeRow(r.row, r.block_table, r.start, r.length) for r in rows if not scored(r)]
        topk = [r for r in rows if scored(r)]
        plan = topk_decode_plan([r.block_table for r in topk], [r.start + 1 for r in topk], [self.params] * len(topk),
                                geometry["device"]) if topk else None
        return LokiWork(range_work(exact, **geometry) if exact else None, row_index([r.row for r in topk]), plan)

    def cache_packing(self, layer: torch.nn.Module) -> str | None:
        # On the CPU, keys row by row: a decode reads a quarter of its keys whole, scattered, which vLLM's transposed
        # keys would make a read of every key of their blocks.
        return ROWS if ON_CPU else None

    def do_kv_cache_update(self, layer: torch.nn.Module, key: torch.Tensor, value: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        rotation = self.rotation[self.layer(layer.layer_name)[0]]
        if not ON_CPU:
            rotated = torch.bmm(key.transpose(0, 1), rotation).transpose(0, 1)
            super().do_kv_cache_update(layer, rotated.contiguous(), value, kv_cache, slot_mapping)
            return
        n = slot_mapping.shape[0]
        write_kv(*self.cache(layer, kv_cache), key[:n], value[:n], slot_mapping, rotation)

    def attend(self, layer_index: int, out: torch.Tensor, q: torch.Tensor, k: torch.Tensor | None,
               v: torch.Tensor | None, k_cache: torch.Tensor, v_cache: torch.Tensor, work: LokiWork) -> None:
        rotation = self.rotation[layer_index]
        if work.exact is not None:
            # A KV head's query heads share its basis: their rows go through one product, so each basis is read once.
            qr = torch.bmm(q.reshape(self.num_kv_heads, -1, q.shape[-1]), rotation).view(q.shape)
            # Fresh keys only spare prefill chunks a read of the cache.
            kr = None if k is None or not work.exact.prefill.chunks else torch.bmm(k, rotation)
            attend_ranges(out, qr, kr, v, k_cache, v_cache, work.exact, self.scale)
        if work.topk is not None:
            # The op rotates the rows' queries itself and scores only the first d channels, read where the cache
            # holds them. Decodes come first in vLLM's batch, so their rows are a run that it writes in place.
            rows = work.topk_rows
            run = isinstance(rows, slice)
            found = lowrank_topk_decode(q[:, rows].transpose(0, 1), k_cache[..., : self.rank], k_cache, v_cache,
                                        work.topk, self.sets, self.scale, query_rotation=rotation,
                                        out=out[:, rows].transpose(0, 1) if run else None)
            if not run:
                out[:, rows] = found.transpose(0, 1)


class LokiBackend(LongserveBackend):
    registered_name = "LONGSERVE_LOKI"
    impl_cls = LokiImpl
