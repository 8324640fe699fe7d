"""Scheduler: one token budget per step, running requests first, then waiting ones (chunked prefill),
recompute preemption of the newest request when blocks run out."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.config import EngineConfig
from engine.sequence import Sequence, SequenceStatus
from kv_cache.manager import KVCacheManager, PrefixHit


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens this step)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    def __init__(self, config: EngineConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out and give its blocks back at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.free(seq.request_id)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        contended = self.config.long_prefill_token_threshold > 0 and self._num_prefilling() > 1
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = self._chunk(seq, seq.num_computed_tokens, budget, contended)
            while not self.kv.allocate_slots(seq.request_id, seq.num_computed_tokens + n):
                victim = self.running.pop()
                self.preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                out.scheduled.append((seq, n))
                budget -= n
                i += 1
                continue
            break
        if out.preempted:  # a step that preempted admits nobody, or the victim could be starved
            return out
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            hit = (self.kv.find_prefix(seq.request_id, seq.token_ids, seq.cache_salt) if seq.prefix_caching
                   else PrefixHit([], 0))
            cached = hit.num_blocks * self.config.block_size
            n = self._chunk(seq, cached, budget, contended)
            if not self.kv.can_admit(hit, cached + n):
                break
            self.waiting.popleft()
            seq.num_computed_tokens = self.kv.admit(seq.request_id, hit, seq.num_tokens)
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = seq.num_computed_tokens
            self.kv.allocate_slots(seq.request_id, seq.num_computed_tokens + n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append((seq, n))
            budget -= n
        return out

    def _chunk(self, seq: Sequence, num_computed: int, budget: int, contended: bool) -> int:
        n = min(seq.num_tokens - num_computed, budget)
        if contended:
            n = min(n, self.config.long_prefill_token_threshold)
        return n

    def _num_prefilling(self) -> int:
        return len(self.waiting) + sum(1 for s in self.running if s.num_tokens - s.num_computed_tokens > 1)

    def preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks and queue it first to be recomputed."""
        if seq in self.running:
            self.running.remove(seq)
        self.num_preemptions += 1
        self.kv.free(seq.request_id)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
