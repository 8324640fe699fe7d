"""Admission control on what long prompts cost: queued prefill tokens and free KV blocks.

The check and the count happen in one synchronous call on the event loop, after tokenization (the count
needs the token lengths) and before the request reaches the engine, so two requests cannot both pass
against the same headroom. A ticket holds its tokens until the request's prefill is done (its first
output) or it ends, whichever comes first.

- 429 (`rate_limit_exceeded`): queued prefill tokens would pass `max_num_queued_tokens`; the server has
  capacity but it is contended, so the client should come back shortly.
- 503 (`server_overloaded`): the KV blocks the queued prompts need already exceed the free blocks, so a
  new prompt could not start until running requests finish.
A request that finds the queue empty is always admitted, so one long prompt is never refused on size
alone (the context-length check bounds it). Retry-After estimates how long the queue takes to drain.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from engine.async_engine import EngineStats
from server.errors import APIError


@dataclass
class Ticket:
    tokens: int
    blocks: int
    admitted_at: float = field(default_factory=time.monotonic)
    released: bool = False


class Admission:
    def __init__(self, max_queued_tokens: int, block_size: int) -> None:
        self.max_queued_tokens = max_queued_tokens
        self.block_size = block_size
        self.queued_tokens = 0
        self.queued_blocks = 0
        self.draining = False
        self.prefill_rate = 2000.0  # tokens/s, refined from finished prefills
        self.rejections: dict[str, int] = {}

    def admit(self, prompt_lens: list[int], stats: EngineStats) -> Ticket:
        tokens = sum(prompt_lens)
        blocks = sum(math.ceil(n / self.block_size) for n in prompt_lens)
        if self.draining:
            raise self._reject("shutting_down", 503, "shutting_down", "the server is shutting down")
        if self.queued_tokens and self.queued_tokens + tokens > self.max_queued_tokens:
            raise self._reject("queued_tokens", 429, "rate_limit_exceeded", (
                f"too many prompt tokens are waiting for prefill ({self.queued_tokens} queued, this request "
                f"adds {tokens}, the limit is {self.max_queued_tokens})"))
        free = stats.usage.free
        if self.queued_blocks and self.queued_blocks + blocks > free:
            raise self._reject("kv_cache_full", 503, "server_overloaded", (
                f"the KV cache cannot take more prompts now: queued prompts need {self.queued_blocks} blocks, "
                f"this one {blocks}, and {free} are free"))
        self.queued_tokens += tokens
        self.queued_blocks += blocks
        return Ticket(tokens, blocks)

    def release(self, ticket: Ticket, prefilled: bool) -> None:
        if ticket.released:
            return
        ticket.released = True
        self.queued_tokens -= ticket.tokens
        self.queued_blocks -= ticket.blocks
        elapsed = time.monotonic() - ticket.admitted_at
        if prefilled and elapsed > 0:
            self.prefill_rate = 0.8 * self.prefill_rate + 0.2 * (ticket.tokens / elapsed)

    def retry_after(self) -> int:
        return max(1, min(60, math.ceil(self.queued_tokens / self.prefill_rate)))

    def _reject(self, reason: str, status: int, code: str, message: str) -> APIError:
        self.rejections[reason] = self.rejections.get(reason, 0) + 1
        return APIError(status, message, code=code, headers={"Retry-After": str(self.retry_after())})
