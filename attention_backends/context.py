"""The step context: what the model runner tells the attention backends about one engine step.

Built once per step by the engine's model runner, read by the registered attention function and the
backends. It lives here, not in `engine/`, because it is part of the backend contract and backends
never import the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch
from pydantic import BaseModel

from kv_cache.paged_kv import PagedKVCache


class Phase(StrEnum):
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass(frozen=True, slots=True)
class AttentionSpec:
    """The model geometry a backend needs."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_model_len: int
    block_size: int
    # The model's own sliding window per layer (None: full attention), from its config.
    layer_windows: tuple[int | None, ...]


@dataclass(slots=True)
class SeqStep:
    """One sequence's share of a step: queries `[query_start, query_start + query_len)` of the packed batch,
    at positions `[num_cached, num_cached + query_len)`, over the KV held in `block_table`. `prompt_len` is the
    request's prompt length, so a backend can decide by it whatever the chunking or a recompute after preemption."""

    request_id: str
    phase: Phase
    query_start: int
    query_len: int
    num_cached: int
    prompt_len: int
    block_table: torch.Tensor  # int64 block ids
    params: BaseModel
    state: dict[str, Any]  # the backend's per-sequence state, kept across steps
    # The positions this rank runs when the backend selected rows (`select_rows`); None: all of
    # `[num_cached, num_cached + query_len)`.
    positions: torch.Tensor | None = None

    @property
    def context_len(self) -> int:
        return self.num_cached + self.query_len


@dataclass(slots=True)
class BackendBatch:
    """The sequences of one backend within a step, with their tokens' cache slots."""

    seqs: list[SeqStep]
    slot_mapping: torch.Tensor  # [T_backend]
    # Positions of this batch's tokens in the packed step; None when it holds every token in order.
    token_index: torch.Tensor | None
    meta: dict[str, Any] = field(default_factory=dict)  # filled by the backend's prepare()

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.numel())


@dataclass(slots=True)
class StepContext:
    kv: PagedKVCache
    batches: dict[str, BackendBatch]  # backend name -> its sequences
    backends: dict[str, Any]  # backend name -> instance (an AttentionBackend)
