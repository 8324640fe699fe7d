"""longserve's CPU modules (`engine/cpu_modules.py`: one-call RMSNorm, the MLP's gate and up products in one pass)
against the HF modules they replace, on the embedded model in one engine: the two module sets swapped in turn
before each request (the order alternating), so the machine's drift reaches both. Prints per-request TTFT and the
median decode step, and the median of the paired differences.

    .venv/bin/python benchmarks/bench_cpu_modules.py [--prompt 1024] [--tokens 24] [--repeats 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import ROOT  # noqa: F401  (puts the repository on sys.path)

import engine.model_loader as model_loader
from engine.config import EngineConfig
from engine.cpu_linear import use_cpu_linears
from engine.cpu_modules import CpuRMSNorm, GateUpMLP
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=8)
    args = ap.parse_args()

    model_loader.use_cpu_modules = use_cpu_linears  # load the HF modules (their products on CpuLinear in both)
    engine = LLMEngine(EngineConfig(max_model_len=8192, kv_cache_memory=2.0, max_num_batched_tokens=2048))
    model = engine.runner.model.model
    hf = [(layer.input_layernorm, layer.post_attention_layernorm, layer.mlp) for layer in model.layers] + [model.norm]
    ours = [(CpuRMSNorm(a), CpuRMSNorm(b), GateUpMLP(m)) for a, b, m in hf[:-1]] + [CpuRMSNorm(hf[-1])]

    def use(modules: list) -> None:
        for layer, (a, b, m) in zip(model.layers, modules[:-1]):
            layer.input_layernorm, layer.post_attention_layernorm, layer.mlp = a, b, m
        model.norm = modules[-1]

    g = torch.Generator().manual_seed(0)
    sp = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)

    def request() -> tuple[float, float]:
        engine.add_request(torch.randint(100, 40000, (args.prompt,), generator=g).tolist(), sp)
        start = time.perf_counter()
        engine.step()
        ttft, steps = time.perf_counter() - start, []
        while engine.has_unfinished_requests():
            start = time.perf_counter()
            engine.step()
            steps.append(time.perf_counter() - start)
        return ttft, statistics.median(steps)

    use(ours)
    request()  # warm-up
    runs: dict[str, list[tuple[float, float]]] = {"HF modules": [], "cpu_modules": []}
    for rep in range(args.repeats):
        for name in (list(runs) if rep % 2 == 0 else list(runs)[::-1]):
            use(hf if name == "HF modules" else ours)
            runs[name].append(request())

    print(f"\n{args.prompt}-token prompt, {args.tokens} tokens, {args.repeats} interleaved repeats")
    print("\n| modules | TTFT (median) | decode step (median) |\n|---|---|---|")
    for name, r in runs.items():
        ttft, step = statistics.median(x[0] for x in r), statistics.median(x[1] for x in r)
        print(f"| {name} | {ttft:.3f} s | {1e3 * step:.1f} ms |")
    pairs = list(zip(runs["HF modules"], runs["cpu_modules"]))
    ttft, step = (statistics.median(b[i] - a[i] for a, b in pairs) for i in (0, 1))
    print(f"\nmedian paired difference (cpu_modules - HF modules): TTFT {ttft:+.3f} s, decode step {1e3 * step:+.1f} "
          "ms")


if __name__ == "__main__":
    main()
