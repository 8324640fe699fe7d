"""Requests that end early: clients that leave, a request that fails in the engine, SIGTERM with work in flight."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from server_harness import MODEL

from attention_backends.dense import DenseBackend
from attention_backends.registry import register_backend

ROOT = Path(__file__).resolve().parents[1]


def _wait_all_free(server, timeout: float = 2.0) -> float:
    """Seconds until the KV pool holds no block and /metrics shows nothing running or waiting; fails after timeout."""
    start = time.monotonic()
    while True:
        used = server.engine.engine.usage().used
        running = server.metric("vllm:num_requests_running") + server.metric("vllm:num_requests_waiting")
        if used == 0 and running == 0:
            return time.monotonic() - start
        assert time.monotonic() - start < timeout, f"{used} blocks still used, {running} requests still in"
        time.sleep(0.02)


def test_cancelled_streams_free_everything(server):
    """10 streams cancelled mid-generation and 5 while their long prompts are still in prefill."""

    async def decode_then_leave(aclient: openai.AsyncOpenAI, i: int) -> int:
        stream = await aclient.completions.create(model=MODEL, prompt=f"Tale {i}: the fox", max_tokens=400,
                                                  stream=True, extra_body={"ignore_eos": True})
        got = 0
        async for chunk in stream:
            got += bool(chunk.choices)
            if got == 3:
                break
        await stream.close()
        return got

    async def leave_during_prefill(client: httpx.AsyncClient, i: int) -> None:
        prompt = list(range(2000 + i, 5000 + i, 1))[:3000]  # 3000 tokens: several 2048-token steps for five
        with pytest.raises(httpx.ReadTimeout):
            await client.post(f"{server.base_url}/completions", json={"prompt": prompt, "max_tokens": 8,
                                                                      "stream": True}, timeout=0.5)

    async def run():
        aclient = openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        async with httpx.AsyncClient() as client:
            got = await asyncio.gather(*(decode_then_leave(aclient, i) for i in range(10)),
                                       *(leave_during_prefill(client, i) for i in range(5)))
        await aclient.close()
        return got[:10]

    assert asyncio.run(run()) == [3] * 10
    _wait_all_free(server)
    assert server.metric("longserve:request_aborted_total", reason="client_disconnect") >= 15


def test_non_streaming_disconnect_aborts(server):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/completions", json={"prompt": "Count:", "max_tokens": 500,
                                                           "ignore_eos": True}, timeout=1.0)
    _wait_all_free(server)


@register_backend
class FailingBackend(DenseBackend):
    """Dense, except that it raises inside the forward pass: a bug in one request's backend."""

    name = "test_failing"

    def forward(self, layer, q, k, v, batch, scale):
        raise RuntimeError("injected failure")


def test_failure_in_one_request_fails_only_that_request(server):
    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            healthy = [client.post(f"{server.base_url}/completions", json={
                "prompt": f"Healthy {i}", "max_tokens": 12, "temperature": 0, "ignore_eos": True}) for i in range(3)]
            bad = client.post(f"{server.base_url}/completions", json={
                "prompt": "Doomed", "max_tokens": 12, "attention_backend": "test_failing"})
            bad_stream = client.post(f"{server.base_url}/completions", json={
                "prompt": "Doomed too", "max_tokens": 12, "stream": True, "attention_backend": "test_failing"})
            return await asyncio.gather(*healthy, bad, bad_stream)

    *healthy, bad, bad_stream = asyncio.run(run())
    assert all(r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 12 for r in healthy)
    assert bad.status_code == 500 and "injected failure" in bad.json()["error"]["message"]
    frames = [line for line in bad_stream.text.splitlines() if line]
    assert bad_stream.status_code == 200 and '"error"' in frames[-2] and frames[-1] == "data: [DONE]"
    _wait_all_free(server)
    assert httpx.get(f"{server.url}/health").status_code == 200
    again = httpx.post(f"{server.base_url}/completions", json={"prompt": "Still here?", "max_tokens": 2})
    assert again.status_code == 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_drains_in_flight_requests_then_exits_zero(tmp_path):
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "server.cli", "serve", "--config", str(ROOT / "configs/default.yaml"),
           "--port", str(port), "--max-model-len", "1024", "--kv-cache-memory", "0.25", "--shutdown-timeout", "60"]
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.3)
        results: list[httpx.Response] = []

        def request(i: int) -> None:
            results.append(httpx.post(f"{url}/v1/completions", json={
                "prompt": f"Request {i} says", "max_tokens": 40, "ignore_eos": True}, timeout=120))

        threads = [threading.Thread(target=request, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        while not httpx.get(f"{url}/metrics").text.count('vllm:num_requests_running{model_name="smollm2-135m"} 3'):
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert httpx.get(f"{url}/health").status_code == 503  # draining: not ready, still answering
        refused = httpx.post(f"{url}/v1/completions", json={"prompt": "late", "max_tokens": 1})
        assert refused.status_code == 503 and refused.headers["retry-after"]
        for t in threads:
            t.join(timeout=120)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [r.status_code for r in results] == [200] * 3
    assert all(r.json()["usage"]["completion_tokens"] == 40 for r in results)

