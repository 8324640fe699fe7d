"""Running the app under uvicorn, with a drain on SIGTERM.

On SIGTERM (or a first Ctrl-C) the server stops admitting (`/health` turns 503, new generation requests get
503) but keeps its socket open, waits up to `shutdown_timeout` for in-flight requests, then exits 0; what is
still running then is cancelled, which aborts it in the engine. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Generator
from contextlib import contextmanager
from types import FrameType

import uvicorn

from engine.async_engine import AsyncEngine
from engine.llm_engine import LLMEngine
from server.app import build_app
from server.config import ServerConfig
from server.serving import Serving

logger = logging.getLogger(__name__)

MAX_HEADER_BYTES = 16 * 1024  # h11 refuses larger request heads (CVE-2025-48956 was one huge header)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, serving: Serving, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.serving, self.shutdown_timeout = serving, shutdown_timeout
        self._drain: asyncio.Task | None = None

    @contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # Unlike uvicorn's own handler, re-raise nothing afterwards: a drained shutdown is a clean exit.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        loop = asyncio.get_running_loop()

        def on_signal(sig: int, _: FrameType | None) -> None:
            if self._drain is not None:
                self.force_exit = self.should_exit = True
                return
            loop.call_soon_threadsafe(self._start_drain, signal.Signals(sig).name)

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _start_drain(self, name: str) -> None:
        if self._drain is None:
            self._drain = asyncio.ensure_future(self._drain_then_exit(name))

    async def _drain_then_exit(self, name: str) -> None:
        serving = self.serving
        serving.admission.draining = True
        logger.info("%s: no longer admitting; draining %d in-flight requests for up to %.0f s", name,
                    serving.in_flight, self.shutdown_timeout)
        try:
            await asyncio.wait_for(serving.idle.wait(), self.shutdown_timeout)
        except TimeoutError:
            logger.warning("shutdown timeout reached; aborting %d requests", serving.in_flight)
        self.should_exit = True


def serve(config: ServerConfig, log_level: str = "info") -> int:
    if any(ext.run_worker(config.engine) for ext in config.extensions):  # a worker rank: no HTTP here
        return 0
    hooks, engine, server = [], None, None
    try:
        hooks = [hook for ext in config.extensions if (hook := ext.start(config.engine)) is not None]

        def build() -> LLMEngine:
            llm = LLMEngine(config.engine, hooks=hooks)
            for m in config.served_models:  # load calibration artifacts now; a refused one stops the start
                llm.prepare_backend(m.attention_backend, m.attention_params, calibrate=False)
            return llm

        engine = AsyncEngine(build)  # built on the thread that steps it (see AsyncEngine)
        app = build_app(engine, config)
        uv_config = uvicorn.Config(app, host=config.host, port=config.port, log_level=log_level, http="h11",
                                   h11_max_incomplete_event_size=MAX_HEADER_BYTES, timeout_graceful_shutdown=1,
                                   timeout_keep_alive=5)
        server = DrainingServer(uv_config, app.state.serving, config.shutdown_timeout)
        server.run()
    finally:
        if engine is not None:
            engine.shutdown()
        for hook in hooks:
            hook.shutdown()
    return 0 if server.started else 1
