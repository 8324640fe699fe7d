"""The step context: what the model runner tells the attention backends about one engine step.

Built once per step by the engine's model runner, read by the registered attention function and the
backends. It lives here, not in `engine/`, because it is part of the backend contract and backends
never import the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import torch
from pydantic import BaseModel

if TYPE_CHECKING:
    from attention_backends.base import AttentionBackend

ParamsT = TypeVar("ParamsT", bound=BaseModel)
StateT = TypeVar("StateT")
MetaT = TypeVar("MetaT")


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


@dataclass(slots=True, kw_only=True)
class SeqStep(Generic[ParamsT, StateT]):
    """One sequence's share of a step. The step computes its positions `[num_computed_tokens, end)`; this rank runs
    `query_len` of them, packed at rows `[query_start, query_start + query_len)` of its backend's batch: all of
    them, or those `positions` lists when the backend selected rows (`select_rows`). `prompt_len` is the
    request's prompt length, so a backend can decide by it whatever the chunking or a recompute after preemption."""

    request_id: str
    phase: Phase
    query_start: int
    query_len: int
    num_computed_tokens: int  # tokens already in the cache, so the chunk's first position
    num_new_tokens: int  # the chunk: positions [num_computed_tokens, num_computed_tokens + num_new_tokens)
    prompt_len: int
    block_table: torch.Tensor  # int64 block ids
    params: ParamsT
    state: StateT  # the backend's per-sequence state (its `new_state()`), kept across steps
    positions: torch.Tensor | None = None

    @property
    def context_len(self) -> int:
        """Keys up to this rank's last query: the attention context of its rows when they run the whole chunk."""
        return self.num_computed_tokens + self.query_len

    @property
    def end(self) -> int:
        """Tokens in the cache once the step has run."""
        return self.num_computed_tokens + self.num_new_tokens


@dataclass(slots=True)
class BackendBatch(Generic[MetaT]):
    """The sequences of one backend within a step, with their tokens' cache slots, and what the backend's
    `prepare` built from them for every layer."""

    seqs: list[SeqStep]
    slot_mapping: torch.Tensor  # [T_backend]
    # Positions of this batch's tokens in the packed step; None when it holds every token in order.
    token_index: torch.Tensor | None
    meta: MetaT = None  # type: ignore[assignment]  # set to `prepare`'s result before the first layer

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.numel())


@dataclass(slots=True)
class StepContext:
    batches: dict[str, BackendBatch[Any]]  # backend name -> its sequences
    backends: dict[str, AttentionBackend]  # backend name -> instance
