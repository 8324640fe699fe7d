"""longserve's CPU modules (`engine/cpu_modules.py`) against the HF modules they replace, on the embedded model in
one engine, three sets swapped in turn before each request (the order rotating), so the machine's drift reaches
all: HF's modules; HF's layers with longserve's one-call RMSNorm and one-pass gate-up MLP; longserve's decoder
layers (those modules, one QKV product, RoPE in place, no HF wrappers). Every set runs its products on `CpuLinear`.
Prints per-set medians of TTFT and of the decode step, and the median paired differences against HF's modules.

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
from engine.cpu_modules import CpuDecoderLayer, CpuRMSNorm, GateUpMLP
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=8)
    args = ap.parse_args()

    model_loader.use_cpu_modules = use_cpu_linears  # load the HF modules (their products on CpuLinear in all sets)
    engine = LLMEngine(EngineConfig(max_model_len=8192, kv_cache_memory=2.0, max_num_batched_tokens=2048))
    model = engine.runner.model.model
    layers = torch.nn.ModuleList(model.layers)
    hf = [(layer.input_layernorm, layer.post_attention_layernorm, layer.mlp) for layer in layers]
    ours = [(CpuRMSNorm(a), CpuRMSNorm(b), GateUpMLP(m)) for a, b, m in hf]

    def set_modules(modules: list) -> None:
        for layer, (a, b, m) in zip(layers, modules):
            layer.input_layernorm, layer.post_attention_layernorm, layer.mlp = a, b, m

    set_modules(ours)
    cpu_layers = torch.nn.ModuleList(CpuDecoderLayer(layer) for layer in layers)  # built on the CPU norms and MLPs
    norms = {"HF": model.norm, "CPU": CpuRMSNorm(model.norm)}
    sets = {"HF modules": (layers, hf, "HF"), "CPU norms and MLPs": (layers, ours, "CPU"),
            "CPU decoder layers": (cpu_layers, ours, "CPU")}

    def use(name: str) -> None:
        stack, modules, norm = sets[name]
        set_modules(modules)
        model.layers, model.norm = stack, norms[norm]

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

    use("CPU decoder layers")
    request()  # warm-up
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in sets}
    for rep in range(args.repeats):
        names = list(sets)
        for name in names[rep % 3:] + names[: rep % 3]:
            use(name)
            runs[name].append(request())

    print(f"\n{args.prompt}-token prompt, {args.tokens} tokens, {args.repeats} rotating repeats")
    print("\n| modules | TTFT (median) | decode step (median) | paired vs HF: TTFT | decode step |")
    print("|---|---|---|---|---|")
    for name, r in runs.items():
        ttft, step = statistics.median(x[0] for x in r), statistics.median(x[1] for x in r)
        pairs = list(zip(runs["HF modules"], r))
        d_ttft, d_step = (statistics.median(b[i] - a[i] for a, b in pairs) for i in (0, 1))
        print(f"| {name} | {ttft:.3f} s | {1e3 * step:.1f} ms | {d_ttft:+.3f} s | {1e3 * d_step:+.1f} ms |")


if __name__ == "__main__":
    main()
