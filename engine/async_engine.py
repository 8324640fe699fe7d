"""AsyncEngine: the engine loop in a background thread, per-request async streams of outputs.

Requests are validated on the caller's thread (errors raise there, before anything is streamed), then
handed to the loop thread, which alone touches the scheduler and the model. A caller that stops
iterating (a client that went away) aborts its request, and its blocks are freed on the next turn.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from engine.llm_engine import LLMEngine, RequestOutput
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

logger = logging.getLogger(__name__)


class EngineStepError(RuntimeError):
    """The engine failed while running a step that held this request."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._new: deque[Sequence] = deque()
        self._aborts: deque[str] = deque()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="longserve-engine", daemon=True)
        self._thread.start()

    async def generate(self, prompt: str | list[int], sampling: SamplingParams | None = None,
                       request_id: str | None = None, **backend: Any) -> AsyncIterator[RequestOutput]:
        seq = self.engine.new_sequence(prompt, sampling, request_id, **backend)
        rid = seq.request_id
        if rid in self._streams:
            raise ValueError(f"request id {rid!r} is already in use")
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = (asyncio.get_running_loop(), queue)
        self._new.append(seq)
        self._wake.set()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
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

    def _post(self, request_id: str, item: RequestOutput | BaseException) -> None:
        target = self._streams.get(request_id)
        if target is None:
            return
        loop, queue = target
        if isinstance(item, BaseException) or item.finished:
            self._streams.pop(request_id, None)
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the caller's event loop is closed; nobody is listening any more
            self.engine.abort(request_id)

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
                    self._post(rid, EngineStepError(f"request {rid} failed inside the engine: {exc}"))
                continue
            for out in outputs:
                self._post(out.request_id, out)
