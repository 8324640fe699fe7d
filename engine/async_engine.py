"""AsyncEngine: the engine loop in a background thread, per-request async streams of outputs.

Requests are validated on the caller's thread (`LLMEngine.new_sequence` raises there, before anything is
streamed), then handed to the loop thread, which alone touches the scheduler and the model. A caller that
stops iterating (a client that went away) aborts its requests, and their blocks are freed on the next turn.
After every turn the loop publishes an `EngineStats` snapshot, so readers on other threads (metrics,
admission control) never walk the scheduler's queues while it changes them.

Given a factory instead of an engine, the loop thread also builds the engine (the server does this). torch's
OpenMP (GNU libgomp) keeps a team of worker threads per thread that ever ran a parallel op; once a process has
more of them than cores, libgomp stops spinning at its barriers and every op pays for waking its workers. A model
loaded on the main thread and stepped on this one made two teams: decode steps took ~1.7x their time.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from engine.llm_engine import EngineStepError, LLMEngine, RequestOutput
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from kv_cache.block_pool import PoolUsage

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EngineStats:
    running: tuple[str, ...]  # request ids
    waiting: tuple[str, ...]
    usage: PoolUsage
    num_preemptions: int


class AsyncEngine:
    def __init__(self, engine: LLMEngine | Callable[[], LLMEngine]) -> None:
        """Runs `engine`, or the engine that `engine()` builds on the loop thread (its errors raise here)."""
        self._new: deque[Sequence] = deque()
        self._aborts: deque[str] = deque()
        # request id -> (the caller's loop, its queue, the sequence's index in the caller's group)
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue, int]] = {}
        self._wake = threading.Event()
        self._stop = False
        ready = threading.Event()
        failed: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(engine, ready, failed), name="longserve-engine",
                                        daemon=True)
        self._thread.start()
        ready.wait()
        if failed:
            self._thread.join()
            raise failed[0]

    async def generate(self, prompt: str | list[int], sampling: SamplingParams | None = None,
                       request_id: str | None = None, **backend: Any) -> AsyncIterator[RequestOutput]:
        """One request's outputs; validation errors raise on the first iteration."""
        seq = self.engine.new_sequence(prompt, sampling, request_id, **backend)
        async for _, out in self.stream([seq]):
            yield out

    async def stream(self, seqs: list[Sequence]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Run validated sequences together (the n choices or the prompts of one API request); yields
        `(index in seqs, output)` as steps produce them. An error in one aborts the others."""
        taken = [s.request_id for s in seqs if s.request_id in self._streams]
        if taken or len({s.request_id for s in seqs}) < len(seqs):
            raise ValueError(f"request id {(taken or [seqs[0].request_id])[0]!r} is already in use")
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        for i, seq in enumerate(seqs):
            self._streams[seq.request_id] = (loop, queue, i)
        self._new.extend(seqs)
        self._wake.set()
        pending = {s.request_id for s in seqs}
        try:
            while pending:
                index, item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    pending.discard(item.request_id)
                yield index, item
        finally:
            for rid in pending:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self._aborts.append(request_id)
        self._wake.set()

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=30)

    # -- the loop thread --------------------------------------------------------------------------

    def _snapshot(self) -> EngineStats:
        sched = self.engine.scheduler
        return EngineStats(tuple(s.request_id for s in sched.running), tuple(s.request_id for s in sched.waiting),
                           self.engine.usage(), sched.num_preemptions)

    def _post(self, request_id: str, item: RequestOutput | BaseException) -> None:
        target = self._streams.get(request_id)
        if target is None:
            return
        loop, queue, index = target
        if isinstance(item, BaseException) or item.finished:
            self._streams.pop(request_id, None)
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (index, item))
        except RuntimeError:  # the caller's event loop is closed; nobody is listening any more
            self.engine.abort(request_id)

    def _run(self, engine: LLMEngine | Callable[[], LLMEngine], ready: threading.Event,
             failed: list[BaseException]) -> None:
        try:
            self.engine = engine if isinstance(engine, LLMEngine) else engine()
            self.stats = self._snapshot()
        except BaseException as exc:
            failed.append(exc)
            return
        finally:
            ready.set()
        self._loop()

    def _loop(self) -> None:
        engine = self.engine
        while not self._stop:
            while self._aborts:
                engine.abort(self._aborts.popleft())
            while self._new:
                seq = self._new.popleft()
                if seq.request_id in self._streams:
                    engine.enqueue(seq)
            if not engine.has_unfinished_requests():
                self.stats = self._snapshot()
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                outputs = engine.step()
            except Exception as exc:  # fail the requests of this step, keep serving the others
                logger.exception("engine step failed")
                running = [s.request_id for s in engine.scheduler.running]
                for rid in running:
                    engine.abort(rid)
                    self._post(rid, EngineStepError(f"request {rid} failed inside the engine: {exc}", exc))
                outputs = []
            while engine.step_errors:
                rid, exc = engine.step_errors.popitem()
                self._post(rid, EngineStepError(f"request {rid} failed inside the engine: {exc}", exc))
            self.stats = self._snapshot()
            for out in outputs:
                self._post(out.request_id, out)
