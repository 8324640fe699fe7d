"""A real uvicorn server in a background thread, over an engine the test session shares."""

from __future__ import annotations

import re
import threading
import time

import httpx
import uvicorn

from attention_backends.base import NoParams
from engine.async_engine import AsyncEngine
from server.app import build_app
from server.config import ServedModel, ServerConfig

MODEL = "smollm2-135m"
ALT_MODEL = "smollm2-135m:alt"


class RunningServer:
    def __init__(self, engine: AsyncEngine, **overrides) -> None:
        overrides.setdefault("served_models", [ServedModel(MODEL, "dense", NoParams()),
                                               ServedModel(ALT_MODEL, "dense", NoParams())])
        self.config = ServerConfig(engine.engine.config, **overrides)
        self.engine = engine
        self.app = build_app(engine, self.config)
        self.serving = self.app.state.serving
        self._server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning",
                                                     http="h11", timeout_graceful_shutdown=1))
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def metric(self, name: str, headers: dict | None = None, **labels: str) -> float:
        """A sample's value from /metrics (the sum over label sets matching `labels`)."""
        text = httpx.get(f"{self.url}/metrics", headers=headers).text
        total = 0.0
        for line in text.splitlines():
            m = re.match(rf"^{re.escape(name)}(\{{.*\}})? (\S+)$", line)
            if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
                total += float(m.group(2))
        return total

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
