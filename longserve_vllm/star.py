"""LONGSERVE_STAR: Star Attention on one host, with longserve's `star` params.

A prompt's last `query_tokens` tokens are its query, the rest its context. Context tokens of block 0 attend
causally; those of a later block to the anchor and causally to their own block; query and generated tokens attend
exactly to everything before them (`attention_backends.star.segments`, the cut longserve's engine makes).

The split needs each request's prompt length, which vLLM gives a backend only for Reference Sliding Window
Attention (`rswa_prefix_lens`, filled when the model config names an R-SWA window): this backend names one as long
as the model, so the model runner passes the lengths, and declares R-SWA support so vLLM's selector accepts it.
vLLM's other backends would read that window, but a deployment runs this one in every layer. Where longserve's
server splits a chat at its last user turn, here every request's query is its trailing `query_tokens`. Context
K/V depends on the split, which the token hashes of vLLM's prefix cache cannot see, so prefix caching is refused.
Star's multi-host sharding needs longserve's engine: vLLM's context parallelism shards a sequence's KV but not its
phase-1 blocks.
"""

from __future__ import annotations

from collections.abc import Hashable

import torch
from vllm.config import get_current_vllm_config

from attention_backends.kernels.ranges import RangeRow
from attention_backends.star import StarLayout, StarParams, segments
from longserve_vllm.backend import LongserveBackend, RangeImpl
from longserve_vllm.config import LongserveConfigError
from longserve_vllm.metadata import StepRow


class StarImpl(RangeImpl):
    method = "star"
    params: StarParams

    def check_params(self) -> None:
        config = get_current_vllm_config()
        p, page = self.params, config.cache_config.block_size
        if p.block_size % page or p.anchor % page:
            raise LongserveConfigError(f"LONGSERVE_STAR: block_size and anchor_size must be multiples of the KV cache "
                                       f"block size ({page}), got {p.block_size} and {p.anchor}")
        if self.own_window is not None:
            raise LongserveConfigError("LONGSERVE_STAR does not combine with a model's own sliding window")
        if config.cache_config.enable_prefix_caching:
            raise LongserveConfigError("LONGSERVE_STAR's context K/V depends on each prompt's context/query split, "
                                       "which prefix caching cannot see: serve with --no-enable-prefix-caching")
        if config.parallel_config.world_size > 1 or config.parallel_config.decode_context_parallel_size > 1:
            raise LongserveConfigError("LONGSERVE_STAR runs on one rank; longserve's engine shards Star's context")
        model = config.model_config
        if model.rswa_window is None:  # see the module docstring: how prompt lengths reach the builder
            model.model_arch_config.rswa_window = model.max_model_len

    def range_rows(self, kind: Hashable, rows: list[StepRow]) -> list[RangeRow]:
        out = []
        for r in rows:
            if r.prompt_len is None:
                raise RuntimeError("LONGSERVE_STAR needs prompt lengths, which this vLLM's model runner did not pass")
            lay = StarLayout.of(self.params, r.prompt_len, 1)
            out += [RangeRow(r.row + s.offset, r.block_table, s.start, s.length, s.sinks, lo=s.lo)
                    for s in segments(torch.arange(r.start, r.start + r.length), lay)]
        return out


class StarBackend(LongserveBackend):
    registered_name = "LONGSERVE_STAR"
    impl_cls = StarImpl

    @classmethod
    def supports_rswa(cls) -> bool:
        return True
