"""Star Attention across real processes (gloo): 2 and 3 ranks give the single-process mode's greedy tokens, through
the engine and through `longserve serve --star-world-size 2` with the `openai` client; a killed worker turns
star requests into 503s while dense requests go on, and shutdown leaves no rank running."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from backend_harness import ROOT, greedy_mixed, greedy_with_logprobs
from conftest import natural_text

from distributed.star_group import StarGroup
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from server.config import read_config_file, served_models_from

CONFIG = EngineConfig(num_kv_blocks=700, max_model_len=4096, max_num_batched_tokens=512)
# A: 1,500 tokens in 256-token blocks (6 blocks, so every rank owns some); B: 128-token blocks behind a 64-token
# anchor with a 100-token query; C runs dense in the same steps.
PARAMS = [{"block_size": 256, "query_tokens": 32}, {"block_size": 128, "anchor_size": 64, "query_tokens": 100}]


@pytest.fixture(scope="module")
def prompts(loaded):
    return [loaded.tokenizer.encode(natural_text(n, 31 + n))[:length] for n, length in ((70, 1500), (45, 900))]


def run_mixed(engine: LLMEngine, prompts: list[list[int]]) -> list[tuple[list[int], list[float]]]:
    """The two star requests and a dense one, all in the same steps (each request's own params)."""
    star = [(p, {"attention_backend": "star", "attention_params": params}) for p, params in zip(prompts, PARAMS)]
    return greedy_mixed(engine, [*star, (prompts[1][:300], {})])


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_give_the_single_process_tokens(world_size, make_engine, loaded, prompts):
    single = run_mixed(make_engine(**{k: getattr(CONFIG, k) for k in ("num_kv_blocks", "max_num_batched_tokens")}),
                       prompts)
    group = StarGroup.launch(CONFIG, world_size, timeout=60)
    try:
        engine = LLMEngine(CONFIG, loaded=loaded, hooks=[group])
        ranked = run_mixed(engine, prompts)
        again = greedy_with_logprobs(engine, prompts[:1], attention_backend="star", attention_params=PARAMS[0])
        assert group.blocks_in_use(engine.usage().used) == [0] * world_size  # every rank freed every block
        group.check()  # no rank failed along the way
    finally:
        group.shutdown()
    assert all(p.poll() is not None for p in group.workers)
    for (st, sl), (rt, rl) in zip(single, ranked, strict=True):
        assert rt == st
        # Ranks merge per-rank partial softmaxes; the sums are only reordered.
        assert max(abs(a - b) for a, b in zip(sl, rl)) < 1e-4
    assert again[0][0] == single[0][0]  # the workers dropped the finished requests and serve new ones


def test_rank_0_books_the_workers_pools(make_engine, loaded, prompts):
    """Rank 0 keeps only its own blocks, so its pool admits more than a worker's holds: with workers of 90 blocks,
    two requests that need ~60 each at once run one after the other (one is preempted, then recomputed) and
    still give the single-process tokens; one that needs more than a whole worker pool fails alone."""
    from engine.llm_engine import EngineStepError
    from engine.sampling_params import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    two = [prompts[0], prompts[0][100:] + prompts[0][:100]]
    single = make_engine(num_kv_blocks=700).generate(two, sp, attention_backend="star", attention_params=PARAMS[0])
    group = StarGroup.launch(EngineConfig(num_kv_blocks=90, max_model_len=1024, max_num_batched_tokens=512), 2,
                             timeout=60)
    try:
        engine = LLMEngine(CONFIG, loaded=loaded, hooks=[group])
        ranked = engine.generate(two, sp, attention_backend="star", attention_params=PARAMS[0])
        assert [o.token_ids for o in ranked] == [o.token_ids for o in single]
        assert engine.scheduler.num_preemptions >= 1
        huge = loaded.tokenizer.encode(natural_text(140, 4))[:3000]
        with pytest.raises(EngineStepError, match="does not fit a worker rank's KV pool"):
            engine.generate([huge], sp, attention_backend="star", attention_params=PARAMS[0])
        assert engine.generate(two[:1], sp, attention_backend="star",
                               attention_params=PARAMS[0])[0].token_ids == single[0].token_ids
        assert group.blocks_in_use(engine.usage().used) == [0, 0]
        group.check()
    finally:
        group.shutdown()


def _chat(document: str) -> list[dict]:
    return [{"role": "system", "content": "You answer from the document."},
            {"role": "user", "content": document},
            {"role": "assistant", "content": "I have read it."},
            {"role": "user", "content": "In chapter 3, what does the keeper of the lantern do?"}]


@pytest.fixture(scope="module")
def ranked_server(tmp_path_factory):
    """`longserve serve --config configs/star-2ranks.yaml` as a real process: rank 0 and one worker."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = tmp_path_factory.mktemp("star") / "server.log"
    cmd = [sys.executable, "-m", "server.cli", "serve", "--config", str(ROOT / "configs/star-2ranks.yaml"),
           "--port", str(port), "--max-model-len", "4096", "--kv-cache-memory", "0.25", "--star-timeout", "30"]
    log = log_path.open("w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"},
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.5)
        yield proc, url, log_path
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_server_with_two_ranks_answers_as_one_process(ranked_server, start_server):
    proc, url, _ = ranked_server
    assert httpx.get(f"{url}/health").json() == {"status": "ok", "star": {"status": "ok", "world_size": 2}}
    recipes = read_config_file(ROOT / "configs/star-2ranks.yaml")["served_models"]
    single = start_server(served_models=served_models_from(recipes, "unused", EngineConfig()))
    messages = _chat(natural_text(110, 8))  # ~2,600 tokens of context: two 2048-token blocks, one per rank
    prompt = natural_text(100, 9) + " The keeper of the river"
    answers = []
    for base in (f"{url}/v1", single.base_url):
        client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
        chat = client.chat.completions.create(model="smollm2-135m:star", messages=messages, max_tokens=16,
                                              temperature=0)
        stream = client.completions.create(model="smollm2-135m:star", prompt=prompt, max_tokens=16, temperature=0,
                                           stream=True)
        answers.append((chat.choices[0].message.content, "".join(c.choices[0].text for c in stream if c.choices)))
    assert answers[0] == answers[1]
    assert chat.usage.prompt_tokens > 2048 + 128


def test_killed_worker_fails_star_requests_with_503_and_shutdown_stops_every_rank(ranked_server):
    proc, url, log_path = ranked_server
    worker = int(subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "distributed.star_worker"], capture_output=True,
                                text=True).stdout.split()[0])
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    outcome: dict = {}

    def long_star_request() -> None:
        try:
            client.chat.completions.create(model="smollm2-135m:star", messages=_chat(natural_text(110, 8)),
                                           max_tokens=1000, temperature=0, extra_body={"ignore_eos": True})
            outcome["status"] = 200
        except openai.APIStatusError as e:
            outcome["status"], outcome["message"] = e.status_code, e.message
        outcome["done"] = time.monotonic()

    thread = threading.Thread(target=long_star_request)
    thread.start()
    while 'vllm:num_requests_running{model_name="smollm2-135m:star"} 1.0' not in httpx.get(f"{url}/metrics").text:
        time.sleep(0.05)
    time.sleep(2.0)  # into its prefill or decode
    os.kill(worker, signal.SIGKILL)
    killed = time.monotonic()
    thread.join(timeout=60)
    assert outcome["status"] == 503, outcome
    assert outcome["done"] - killed < 30  # within --star-timeout
    assert "Star Attention is unavailable" in outcome["message"]

    dense = client.completions.create(model="smollm2-135m", prompt="The keeper of the river", max_tokens=8)
    assert dense.usage.completion_tokens == 8
    start = time.monotonic()
    with pytest.raises(openai.APIStatusError) as refused:
        client.completions.create(model="smollm2-135m:star", prompt="The keeper", max_tokens=4)
    assert refused.value.status_code == 503 and time.monotonic() - start < 5
    health = httpx.get(f"{url}/health")
    assert health.status_code == 200 and health.json()["status"] == "degraded"
    assert "exited" in health.json()["star"]["reason"] or "failed" in health.json()["star"]["reason"]

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, log_path.read_text()
    assert not _alive(worker)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
