"""A full-attention KV-cache spec whose manager frees the blocks SWAA's windowed layers never read again.

After `L` tokens are cached, the next query (position `L`) sees keys `[0, sinks)` and `[L - window + 1, L]`, so the
blocks past the sink blocks and wholly before `L - window + 1` go back to vLLM's pool (a null block stands in the
block table there), as longserve's engine does with `release_kv`. vLLM's `RSWAManager` frees a middle gap the same
way. The manager runs in the scheduler's process, which knows only this spec's fields.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Self

from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec

from attention_backends.kernels.paged import cdiv


@dataclass(frozen=True, kw_only=True)
class SinkWindowSpec(FullAttentionSpec):
    sinks: int
    window: int

    @classmethod
    def of(cls, spec: FullAttentionSpec, *, sinks: int, window: int) -> Self:
        return cls(**{f.name: getattr(spec, f.name) for f in fields(FullAttentionSpec)}, sinks=sinks, window=window)

    @classmethod
    def merge(cls, specs: list[Self]) -> Self:
        # The base merge rebuilds a plain FullAttentionSpec; the layers of a group share one sink-and-window pair.
        pairs = {(s.sinks, s.window) for s in specs}
        if len(pairs) != 1:
            raise ValueError(f"layers of one KV-cache group must share sinks and window, got {sorted(pairs)}")
        sinks, window = pairs.pop()
        return cls.of(FullAttentionSpec.merge(specs), sinks=sinks, window=window)


class SinkWindowManager(FullAttentionManager):
    def __init__(self, kv_cache_spec: SinkWindowSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.sinks = kv_cache_spec.sinks
        self.window = kv_cache_spec.window

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        first = cdiv(self.sinks, self.block_size)
        last = (processed_computed_tokens - self.window + 1) // self.block_size
        self._remove_blocks_in_range(request_id, first, last)
