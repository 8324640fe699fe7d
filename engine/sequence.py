"""A request as the engine tracks it: tokens, how many are computed, status and sampling state."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch
from pydantic import BaseModel

from engine.detokenizer import IncrementalDetokenizer
from engine.sampling_params import SamplingParams


class SequenceStatus(StrEnum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self not in (SequenceStatus.WAITING, SequenceStatus.RUNNING)


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    backend: str
    backend_params: BaseModel
    max_total_tokens: int  # prompt + output may not exceed this (the model's length)
    generator: torch.Generator | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at first admission
    num_preemptions: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    stop_reason: int | str | None = None
    backend_state: Any = None  # the backend's per-sequence state (its `new_state()`), made when it first runs
    cache_salt: bytes | None = None  # prefix-cache namespace; None: dense-identical KV
    prefix_caching: bool = True  # False: its blocks do not hold positions in order (a compacting backend)
    detokenizer: IncrementalDetokenizer | None = None

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def is_decode(self, num_new_tokens: int) -> bool:
        """One generated token on top of a fully computed context; anything else (prompt chunks, the
        recompute after preemption) is a prefill."""
        return (num_new_tokens == 1 and self.num_computed_tokens == self.num_tokens - 1
                and self.num_computed_tokens >= self.num_prompt_tokens)

    def reset_for_recompute(self) -> None:
        self.num_computed_tokens = 0
        self.backend_state = None  # the recompute starts from nothing
        self.status = SequenceStatus.WAITING
        self.num_preemptions += 1
