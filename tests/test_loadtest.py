"""loadtest: exact metrics on a scripted stream, token-exact prompts, scoring, errors, and a real run."""

from __future__ import annotations

import asyncio
import csv
import json
import random
import threading
import time

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from loadtest.__main__ import main as loadtest_main
from loadtest.client import chat_stream
from loadtest.metrics import parse_slo, summarize
from loadtest.runner import Job, arrival_times, check_target, run_jobs
from loadtest.scoring import score
from loadtest.tokens import LocalTokenizer
from loadtest.workloads import SHORT_LIMIT, SHORT_QUESTIONS, Sample, build, make_task

SCRIPT = [0.20, 0.05, 0.10]  # seconds before each token chunk
EMITTED: list[float] = []  # perf_counter when each token chunk of the last "ok" stream was handed to the server


def _chunk(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"


async def scripted(request: Request):
    model = (await request.json())["model"]
    if model == "http500":
        return JSONResponse({"error": {"message": "boom"}}, status_code=500)

    async def frames():
        if model == "malformed":
            yield "data: {not json\n\n"
            return
        if model == "slow":
            await asyncio.sleep(5)
        for i, gap in enumerate(SCRIPT):
            await asyncio.sleep(gap)
            if model == "instream" and i == 1:
                yield _chunk({"error": {"message": "engine failed"}})
                yield "data: [DONE]\n\n"
                return
            if model == "drop" and i == 1:
                raise RuntimeError("connection dropped mid-stream")
            if model == "ok":
                EMITTED.append(time.perf_counter())
            yield _chunk({"choices": [{"index": 0, "delta": {"content": f"tok{i} "}}]})
        yield _chunk({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": len(SCRIPT)}})
        yield "data: [DONE]\n\n"

    return StreamingResponse(frames(), media_type="text/event-stream")


@pytest.fixture(scope="module")
def sse_server():
    app = Starlette(routes=[Route("/v1/chat/completions", scripted, methods=["POST"])])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=5)


def test_metrics_exact_on_a_scripted_stream(sse_server):
    async def run():
        async with httpx.AsyncClient(base_url=sse_server) as client:
            return await chat_stream(client, "ok", [{"role": "user", "content": "x"}], 3)

    EMITTED.clear()
    r = asyncio.run(run())
    sent = [t - r.start for t in EMITTED]  # the known times, on the client's clock (same process)
    assert r.ok and r.usage_reported and r.output_tokens == 3 and r.prompt_tokens == 7
    assert r.ttft == pytest.approx(sent[0], abs=0.005) and r.ttft >= 0.2
    assert r.itls == pytest.approx([sent[1] - sent[0], sent[2] - sent[1]], abs=0.005)
    assert r.e2el == pytest.approx(sent[2], abs=0.005)
    assert r.tpot == pytest.approx((sent[2] - sent[0]) / 2, abs=0.005)
    # SLOs just above and just below what this request measured: a loaded machine delays the stream, not the verdict.
    met = parse_slo(f"ttft:{r.ttft * 1000 + 1:.3f},tpot:{r.tpot * 1000 + 1:.3f}")
    s = summarize([r], duration=1.0, slo=met)
    assert s["mean_ttft_ms"] == pytest.approx(r.ttft * 1000) and s["median_itl_ms"] == pytest.approx(
        sum(r.itls) / 2 * 1000)
    assert s["p99_e2el_ms"] == pytest.approx(r.e2el * 1000) and s["request_goodput"] == 1.0
    assert summarize([r], 1.0, parse_slo(f"ttft:{r.ttft * 1000 - 1:.3f}"))["goodput_fraction"] == 0.0


def test_errors_are_counted_never_raised(sse_server):
    sample = Sample("passkey", [{"role": "user", "content": "x"}], ["1"], 10, 10, 0.5)
    jobs = [Job(m, sample, "0.5") for m in ("http500", "malformed", "drop", "slow", "instream", "ok")]
    results, _ = asyncio.run(run_jobs(sse_server, jobs, max_concurrency=6, timeout=1.0, progress=False))
    by_model = {r.model: r for r in results}
    assert by_model["ok"].ok and [r.ok for r in results].count(True) == 1
    assert by_model["http500"].status == 500
    assert "JSONDecodeError" in by_model["malformed"].error
    assert "in-stream error" in by_model["instream"].error
    assert by_model["drop"].error and by_model["slow"].error  # a dropped connection, a timeout
    errors = summarize(results, 1.0)["errors"]
    assert errors["500"] == 1 and sum(errors.values()) == 5


def test_time_limit_and_arrivals(sse_server):
    sample = Sample("passkey", [{"role": "user", "content": "x"}], ["1"], 10, 10, 0.5)
    results, duration = asyncio.run(run_jobs(sse_server, [Job("slow", sample, "0.5")] * 2, time_limit=0.5,
                                             progress=False))
    assert duration < 3 and all(r.error == "cancelled at the time limit" for r in results)
    times = arrival_times(50, rate=10, burstiness=0.5, seed=1)
    assert times == sorted(times) and times[-1] == pytest.approx(5.0)
    assert arrival_times(3, float("inf"), 1, 0) == [0, 0, 0]
    with pytest.raises(ValueError, match="allow-remote"):
        check_target("http://10.1.2.3:8000", allow_remote=False)


@pytest.fixture(scope="module")
def tokenizer(loaded):
    return LocalTokenizer(str(loaded.path))


@pytest.mark.parametrize("task", ["passkey", "niah", "niah_text", "vt", "kv"])
def test_prompts_hit_length_and_depth(tokenizer, task):
    for n, depth in ((800, 0.1), (1500, 0.5), (3000, 0.9)):
        rng = random.Random(n)
        s = build(tokenizer, make_task(task, rng, num_keys=3 if task == "niah" else 1), n, depth=depth, rng=rng)
        assert abs(tokenizer.count_chat(s.messages) - n) <= n // 100
        assert s.prompt_tokens == tokenizer.count_chat(s.messages)
        assert abs(s.depth - depth) < 0.03, (task, n, s.depth)
        assert all(a in s.messages[0]["content"] or task == "kv" for a in s.answers[:1])
    at = build(tokenizer, make_task(task, random.Random(1)), 1000, offset=512, rng=random.Random(1))
    assert at.needle_offsets[0] == 512  # on a KV-block boundary (32 blocks of 16)


def test_scoring():
    assert score("passkey", ["48213"], "The pass key is 48213.")
    assert not score("passkey", ["48213"], "It is 1, then 48213")
    assert score("niah", ["123", "456"], "Numbers: 456 and 123")
    assert not score("niah", ["123", "456"], "Only 123")
    assert score("vt", ["VAR_A", "VAR_B"], "var_a, VAR_B")


def test_end_to_end_against_the_real_server(start_server, tmp_path):
    from attention_backends.base import NoParams
    from attention_backends.registry import validate_params
    from server.config import ServedModel

    swaa = validate_params("sliding_window", {"window": 256, "sinks": 16})
    server = start_server(served_models=[ServedModel("dense", "dense", NoParams()),
                                         ServedModel("swaa", "sliding_window", swaa)])
    code = loadtest_main(["--base-url", server.url, "--tasks", "passkey,short", "--lengths", "300,600", "--depths",
                          "0.1,0.5,0.9", "--max-concurrency", "4", "--out", str(tmp_path), "--no-progress",
                          "--slo", "ttft:60000"])
    assert code == 0
    report = json.loads(next(tmp_path.glob("loadtest-*.json")).read_text())
    assert report["completed"] == 12 + 2 * len(SHORT_QUESTIONS) and report["failed"] == 0
    assert {"mean_ttft_ms", "median_tpot_ms", "p99_itl_ms", "mean_e2el_ms", "request_throughput",
            "output_throughput", "request_goodput"} <= set(report)
    assert set(report["per_model"]) == {"dense", "swaa"} and len(report["accuracy"]) == 12 + 2
    rows = list(csv.DictReader(next(tmp_path.glob("loadtest-*.csv")).open()))
    short = [r for r in rows if r["task"] == "short"]
    rows = [r for r in rows if r["task"] != "short"]
    assert len(rows) == 12 and all(abs(int(r["prompt_tokens"]) - int(r["target_tokens"])) <= 6 for r in rows)
    # Scored against dense's own answers; a 256-token window is dense on questions this short.
    assert all(int(r["prompt_tokens"]) < SHORT_LIMIT and r["correct"] == "True" for r in short), short
    for png in ("ttft_vs_length.png", "accuracy_heatmap.png", "latency_cdf.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
