"""LONGSERVE_SWAA: sliding-window attention adaptation, with longserve's `sliding_window` params.

In a windowed layer a query sees the first `sinks` tokens and the last `window` (itself included); `prefill_only`
windows prefill and keeps decode exact; `full_attention_layers` keep exact attention. A layer with a window of its
own in the model's config keeps that window and no sinks, as longserve's engine does. vLLM's "sinks" (learned
per-head logits) are another thing and are refused. With `release_kv` the layers' KV-cache spec is a
`SinkWindowSpec`, whose manager hands the blocks between the sinks and the window back to vLLM's pool.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import ClassVar

from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec

from attention_backends.kernels.ranges import RangeRow
from attention_backends.sliding_window import SlidingWindowParams
from longserve_vllm.backend import LongserveBackend, RangeImpl
from longserve_vllm.config import LongserveConfigError
from longserve_vllm.kv_spec import SinkWindowSpec
from longserve_vllm.metadata import StepRow


class SWAAImpl(RangeImpl):
    method = "sliding_window"
    params: SlidingWindowParams
    # The params this process's layers were built with: vLLM asks the backend class for the layers' KV-cache spec
    # (`customize_spec`) after building them, with no config at hand.
    deployed: ClassVar[SlidingWindowParams | None] = None

    def check_params(self) -> None:
        try:
            self.full = self.params.full_layers(self.num_layers)
        except ValueError as e:
            raise LongserveConfigError(f"LONGSERVE_SWAA: {e}") from None
        SWAAImpl.deployed = self.params

    def kind(self, layer_index: int) -> Hashable:
        return (self.own_window is None and layer_index not in self.full, self.own_window)

    def range_rows(self, kind: Hashable, rows: list[StepRow]) -> list[RangeRow]:
        windowed, own = kind
        p = self.params
        return [RangeRow(r.row, r.block_table, r.start, r.length,
                         *((p.sinks, p.window) if windowed and (r.prefilling or not p.prefill_only) else (0, own)))
                for r in rows]


class SWAABackend(LongserveBackend):
    registered_name = "LONGSERVE_SWAA"
    impl_cls = SWAAImpl

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        spec = super().customize_spec(spec)
        params = SWAAImpl.deployed
        # A layer with the model's own sliding window keeps its spec (and vLLM's manager for it).
        if params is None or not params.release_kv or type(spec) is not FullAttentionSpec:
            return spec
        return SinkWindowSpec.of(spec, sinks=params.sinks, window=params.window)
