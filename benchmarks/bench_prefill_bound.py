"""How fast a float32 prefill of the embedded model can be on this machine: a prompt's arithmetic against the
machine's measured rates, and so the lowest TTFT ratio any exact prefill could reach against a measured peer
(issue 19's TTFT targets).

Rates, measured here:
- the FMA peak: every thread runs independent fused multiply-adds on the widest vectors the compiler targets
  (a loop compiled with -march=native that touches no memory);
- the engine's float32 linear layers (`CpuLinear`: oneDNN's matmul at a chunk's rows) on the products of a
  2,048-token chunk (the shapes the linear layers run).

Work, from the model's config: the products' FLOPs (2 per weight per token, the logits for the last token only)
and causal attention's (4 * query heads * head_dim per visible query-key pair, every layer). Element-wise ops,
RoPE and norms are left out, so the bound is generous.

    .venv/bin/python benchmarks/bench_prefill_bound.py [--lengths 1024,2048,4096,7680] [--ttft 7680=16.42,...]

`--ttft` takes measured TTFTs in seconds (vLLM-CPU's from bench_vs_vllm.py, say) and prints the ratio a prefill
running at the peak, and at the matmul rate throughout, would reach against each.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_prefill_kernel import attention_flops  # puts the repository on sys.path (through common)
from torch.utils.cpp_extension import load_inline
from transformers import AutoConfig

from engine.cpu_linear import CpuLinear
from engine.model_loader import resolve_model_dir

FMA_LOOP = r"""
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <chrono>
#include <vector>

// 24 independent accumulators: enough to keep both FMA ports busy through their latency on any x86 core.
double fma_peak(int64_t iterations) {
  using Lanes = float __attribute__((vector_size(64)));
  std::vector<double> sums(at::get_num_threads());
  const auto start = std::chrono::steady_clock::now();
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      Lanes acc[24], x, y;
      for (int i = 0; i < 16; ++i) x[i] = 1.0000001f, y[i] = 0.9999999f;
      for (int j = 0; j < 24; ++j) acc[j] = x * static_cast<float>(j);
      for (int64_t it = 0; it < iterations; ++it)
#pragma GCC unroll 24
        for (int j = 0; j < 24; ++j) acc[j] = acc[j] * x + y;
      double s = 0;
      for (int j = 0; j < 24; ++j) s += acc[j][0];
      sums[t] = s;
    }
  });
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  double s = 0;
  for (double v : sums) s += v;
  TORCH_CHECK(s == s, "unreachable: keeps the loop's results live");
  return 2.0 * 16 * 24 * iterations * at::get_num_threads() / seconds;
}
"""


def fma_peak(repeats: int) -> float:
    module = load_inline("longserve_fma_peak", cpp_sources=FMA_LOOP, functions=["fma_peak"],
                         extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])
    return statistics.median(module.fma_peak(20_000_000) for _ in range(repeats))


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def products(config) -> list[tuple[int, int]]:
    """(in, out) of each linear layer of one decoder layer."""
    h, d = config.hidden_size, head_dim(config)
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * d
    return [(h, qkv), (config.num_attention_heads * d, h), (h, 2 * config.intermediate_size),
            (config.intermediate_size, h)]


def matmul_rate(config, rows: int, repeats: int) -> float:
    shapes = products(config)
    xs = [torch.randn(rows, i) for i, _ in shapes]
    layers = [CpuLinear(torch.nn.Linear(i, o, bias=False)) for i, o in shapes]
    flops = sum(2 * rows * i * o for i, o in shapes)
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            for x, layer in zip(xs, layers):
                layer(x)
            times.append(time.perf_counter() - start)
    return flops / statistics.median(times)


def prefill_flops(config, n: int) -> tuple[float, float]:
    """(products, attention) FLOPs of an n-token prompt's prefill."""
    weights = config.num_hidden_layers * sum(i * o for i, o in products(config))
    linear = 2 * n * weights + 2 * config.hidden_size * config.vocab_size
    return linear, config.num_hidden_layers * attention_flops(config.num_attention_heads, head_dim(config), 0, n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="1024,2048,4096,7680")
    ap.add_argument("--ttft", default="", help="LENGTH=SECONDS,...: measured TTFTs to set the bounds against")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    config = AutoConfig.from_pretrained(resolve_model_dir(None))
    peak, mm = fma_peak(args.repeats), matmul_rate(config, 2048, args.repeats)
    measured = {int(k): float(v) for k, v in (item.split("=") for item in args.ttft.split(",") if item)}
    print(f"{torch.get_num_threads()} threads: FMA peak {peak / 1e9:.0f} GFLOPS, the linear layers (CpuLinear) on a "
          f"2,048-token chunk's products {mm / 1e9:.0f} GFLOPS ({mm / peak:.0%} of the peak)")
    print("| prompt tokens | products | attention | at the FMA peak | at the matmul rate | measured TTFT | "
          "best ratio at the peak / at the matmul rate |")
    print("|---|---|---|---|---|---|---|")
    for n in (int(x) for x in args.lengths.split(",")):
        linear, attention = prefill_flops(config, n)
        at_peak, at_mm = (linear + attention) / peak, (linear + attention) / mm
        ttft = measured.get(n)
        ratio = f"{at_peak / ttft:.2f}x / {at_mm / ttft:.2f}x" if ttft else ""
        print(f"| {n:,} | {linear / 1e12:.2f} TFLOP | {attention / 1e12:.2f} TFLOP | {at_peak:.2f} s | {at_mm:.2f} s | "
              f"{f'{ttft:.2f} s' if ttft else ''} | {ratio} |")


if __name__ == "__main__":
    main()
