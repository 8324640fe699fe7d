"""HTTP overhead: the same work through `longserve serve` and on the in-process AsyncEngine, same run.

    .venv/bin/python benchmarks/bench_http.py [--repeats 3] [--requests 64] [--concurrency 8] [--max-tokens 32]

64 requests (a short prompt, 32 greedy output tokens each, EOS ignored), 8 in flight at a time. The server
runs in its own process with the same engine settings; the in-process baseline drives an AsyncEngine with
8 asyncio workers, so both see the same batching. Runs alternate and the median of each is compared.
Target (issue 3): server / in-process <= 1.10x.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import httpx  # noqa: E402

from engine.async_engine import AsyncEngine  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402

ENGINE = {"max_model_len": 1024, "kv_cache_memory": 0.5, "max_num_batched_tokens": 2048, "max_num_seqs": 64}


def prompts(n: int) -> list[str]:
    return [f"Request {i}: write a short note about the number {i * 37 % 101}." for i in range(n)]


async def drive(work: list[str], concurrency: int, one) -> tuple[float, int]:
    queue: asyncio.Queue[str] = asyncio.Queue()
    for p in work:
        queue.put_nowait(p)
    total = 0

    async def worker() -> None:
        nonlocal total
        while not queue.empty():
            n = await one(queue.get_nowait())
            total += n

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start, total


def run_in_process(engine: AsyncEngine, work: list[str], concurrency: int, max_tokens: int) -> tuple[float, int]:
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)

    async def one(prompt: str) -> int:
        outs = [out async for out in engine.generate(prompt, sp)]
        return len(outs[-1].token_ids)

    return asyncio.run(drive(work, concurrency, one))


def run_http(url: str, work: list[str], concurrency: int, max_tokens: int) -> tuple[float, int]:
    async def main() -> tuple[float, int]:
        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
            async def one(prompt: str) -> int:
                r = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens,
                                                              "temperature": 0, "ignore_eos": True})
                r.raise_for_status()
                return r.json()["usage"]["completion_tokens"]

            return await drive(work, concurrency, one)

    return asyncio.run(main())


def start_server() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in ENGINE.items()]
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--uvicorn-log-level",
                             "warning", *flags], cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not start")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    work = prompts(args.requests)
    engine = AsyncEngine(LLMEngine(EngineConfig(**ENGINE)))
    proc, url = start_server()
    try:
        run_in_process(engine, work[:8], args.concurrency, args.max_tokens)  # warm both paths once
        run_http(url, work[:8], args.concurrency, args.max_tokens)
        local, remote = [], []
        for _ in range(args.repeats):
            t, n = run_in_process(engine, work, args.concurrency, args.max_tokens)
            assert n == args.requests * args.max_tokens
            local.append(t)
            t, n = run_http(url, work, args.concurrency, args.max_tokens)
            assert n == args.requests * args.max_tokens
            remote.append(t)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        engine.shutdown()
    ours, base = statistics.median(remote), statistics.median(local)
    tokens = args.requests * args.max_tokens
    print(f"\n{args.requests} requests x {args.max_tokens} tokens, concurrency {args.concurrency}, "
          f"median of {args.repeats}; runs (s): server {[round(t, 2) for t in remote]}, "
          f"in-process {[round(t, 2) for t in local]}")
    print("| measure | server (HTTP) | in-process AsyncEngine | ratio | target |")
    print("|---|---|---|---|---|")
    print(f"| wall time | {ours:.2f} s | {base:.2f} s | {ours / base:.3f}x | <= 1.10x |")
    print(f"| output tokens/s | {tokens / ours:.1f} | {tokens / base:.1f} | {base / ours:.3f}x | |")
    print(f"| requests/s | {args.requests / ours:.2f} | {args.requests / base:.2f} | {base / ours:.3f}x | |")


if __name__ == "__main__":
    main()
