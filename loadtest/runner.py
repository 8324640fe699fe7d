"""Dispatching a matrix of (served model x prompt) requests: open-loop arrivals or a closed loop, bounded
by the number of prompts and a time limit."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from urllib.parse import urlparse

import httpx
from tqdm import tqdm

from loadtest.client import RequestResult, chat_stream
from loadtest.workloads import Sample

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass
class Job:
    model: str
    sample: Sample
    depth_label: str  # "0.5", or "@1024" for a needle at an exact token offset


def check_target(base_url: str, allow_remote: bool) -> None:
    host = urlparse(base_url).hostname
    if host not in LOOPBACK and not allow_remote:
        raise ValueError(f"{base_url} is not a loopback address; pass --allow-remote to load-test it")


def arrival_times(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Send offsets in seconds: all at 0 for an infinite rate, else gamma gaps (shape = burstiness, Poisson at
    1) rescaled so the last send is at exactly n / rate, as `vllm bench serve` does."""
    if rate == float("inf") or n == 0:
        return [0.0] * n
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.gammavariate(burstiness, 1 / (rate * burstiness))
        out.append(t)
    scale = (n / rate) / out[-1]
    return [x * scale for x in out]


async def run_jobs(base_url: str, jobs: list[Job], rate: float = float("inf"), burstiness: float = 1.0,
                   max_concurrency: int | None = None, time_limit: float = 3600.0, timeout: float = 600.0,
                   api_key: str | None = None, seed: int = 0, progress: bool = True
                   ) -> tuple[list[RequestResult], float]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=max_concurrency or len(jobs) or 1)
    gate = asyncio.Semaphore(max_concurrency or len(jobs) or 1)
    offsets = arrival_times(len(jobs), rate, burstiness, seed)
    results: list[RequestResult | None] = [None] * len(jobs)
    bar = tqdm(total=len(jobs), desc="requests", disable=not progress)
    start = time.perf_counter()

    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits) as client:
        async def one(i: int, job: Job) -> None:
            await asyncio.sleep(max(0.0, start + offsets[i] - time.perf_counter()))
            async with gate:
                results[i] = await chat_stream(client, job.model, job.sample.messages, job.sample.max_tokens,
                                               timeout=timeout)
            bar.update()

        tasks = [asyncio.ensure_future(one(i, job)) for i, job in enumerate(jobs)]
        _, pending = await asyncio.wait(tasks, timeout=time_limit)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    duration = time.perf_counter() - start
    bar.close()
    for i, job in enumerate(jobs):
        if results[i] is None:  # never finished before the time limit
            results[i] = RequestResult(job.model, start + offsets[i], error="cancelled at the time limit")
    return results, duration
