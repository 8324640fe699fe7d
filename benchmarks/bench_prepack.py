"""oneDNN's copies of the linear weights (`EngineConfig.cpu_prepacked_weights`) against its products on the plain
weights, on the embedded model: each linear shape of a layer alone (2 threads), then the time to the first token of
whole prompts in one engine with the server's settings, the copies set aside and restored before each request (the
order alternating), so the machine's drift reaches both. Medians, ratios copy / plain, and whether both give the same
greedy tokens.

    .venv/bin/python benchmarks/bench_prepack.py [--prompts 1024,2048,4096] [--repeats 6]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_decode_kernel import interleaved_medians
from common import ROOT  # noqa: F401  (puts the repository on sys.path)

from engine.config import EngineConfig
from engine.cpu_linear import PACK_ROWS, CpuLinear
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams


def product_table(linears: list[CpuLinear], rows: list[int], repeats: int) -> None:
    print("\n| rows | in -> out | plain weight | oneDNN copy | copy / plain |")
    print("|---|---|---|---|---|")
    shapes = {(m.in_features, m.out_features): m for m in linears}
    for m in rows:
        for (i, o), lin in shapes.items():
            x = torch.randn(m, i)
            times = interleaved_medians(
                {name: lambda w=w, x=x, b=lin.bias: torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
                 for name, w in (("plain", lin.weight), ("copy", lin.packed))}, repeats)
            plain, copy = times["plain"], times["copy"]
            gflops = 2 * m * i * o / 1e9
            print(f"| {m:,} | {i:,} -> {o:,} | {plain * 1e3:.2f} ms ({gflops / plain:.0f} GFLOPS) | "
                  f"{copy * 1e3:.2f} ms ({gflops / copy:.0f} GFLOPS) | {copy / plain:.3f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", default="1024,2048,4096")
    ap.add_argument("--repeats", type=int, default=6)
    args = ap.parse_args()

    engine = LLMEngine(EngineConfig(max_model_len=8192, kv_cache_memory=2.0, max_num_batched_tokens=PACK_ROWS))
    linears = [m for m in engine.runner.model.modules() if isinstance(m, CpuLinear) and m.packed is not None]
    if not linears:
        raise SystemExit("no oneDNN copies: the model is not float32 on the CPU, or torch has no oneDNN")
    copies = {m: m.packed for m in linears}
    print(f"{len(linears)} linear layers with copies, {sum(m.weight.nbytes for m in linears) / 2**20:.0f} MiB")
    product_table(linears, [300, 1024, PACK_ROWS], 20)

    def use(packed: bool) -> None:
        for m in linears:
            m.packed = copies[m] if packed else None

    g = torch.Generator().manual_seed(0)

    def first_token(prompt: list[int], max_tokens: int = 1) -> tuple[float, list[int]]:
        engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
        start = time.perf_counter()
        ttft, out = None, None
        while engine.has_unfinished_requests():
            for o in engine.step():
                ttft = ttft or time.perf_counter() - start
                out = o
        return ttft, out.token_ids

    print("\n| prompt | TTFT, plain weights | TTFT, oneDNN copies | copies / plain |")
    print("|---|---|---|---|")
    for n in (int(p) for p in args.prompts.split(",")):
        runs: dict[bool, list[float]] = {False: [], True: []}
        for rep in range(args.repeats + 1):
            for packed in (False, True) if rep % 2 else (True, False):
                use(packed)
                ttft = first_token(torch.randint(100, 40000, (n,), generator=g).tolist())[0]  # a new prompt each
                if rep:  # the first round warms both
                    runs[packed].append(ttft)
        plain, copy = statistics.median(runs[False]), statistics.median(runs[True])
        print(f"| {n:,} | {plain:.3f} s | {copy:.3f} s | {copy / plain:.3f}x |", flush=True)

    prompt = torch.randint(100, 40000, (1500,), generator=g).tolist()
    tokens = []
    for packed in (False, True):
        use(packed)
        tokens.append(first_token(prompt, 16)[1])
    print(f"\nsame 16 greedy tokens after a 1,500-token prompt: {tokens[0] == tokens[1]}")


if __name__ == "__main__":
    main()
