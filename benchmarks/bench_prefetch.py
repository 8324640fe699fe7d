"""Which cache level the C++ kernels' prefetches should fill on this machine: the kernels built twice, prefetching
into the second-level cache (the default) and into the first (`-DLONGSERVE_PREFETCH_LOCALITY=3`, the build that
`LONGSERVE_CPU_FLAGS` selects), timed in turn in one process on what a decode step reads from memory:
- one layer's decode at `--context` (the embedded model's geometry, blocks shuffled, 30 layers' caches in turn, on
  2 MiB pages) in longserve's cache and in vLLM's CPU cache (keys transposed), and Loki's op in longserve's;
- a decode step's linear layers (`linear_rows` over every weight of the model, random values) for 1, 4 and 8 rows.
Outputs of the two builds must be bitwise equal (prefetches change no arithmetic); prints medians of interleaved
repeats and the ratio of the default's time to the other's.

    .venv/bin/python benchmarks/bench_prefetch.py [--context 8192] [--repeats 15]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from bench_decode_kernel import HKV, HQ, D, interleaved_medians, layer_cache, pool
from bench_linear_rows import model_weights

from attention_backends.kernels import cpu_ext
from attention_backends.kernels.decode import decode_plan
from attention_backends.kernels.topk import topk_decode_plan
from attention_backends.loki import LokiParams

BUILDS = {"second level": (), "first level": ("-DLONGSERVE_PREFETCH_LOCALITY=3",)}
LAYERS = 30
CACHES = {"longserve": "longserve's cache", "vllm-cpu": "vLLM's CPU cache"}


def decode_ops(context: int) -> dict[str, Callable]:
    """name -> f(kernels): one decode step's reads of each kind, returning the last layer's output."""
    g = torch.Generator().manual_seed(0)
    ops = {}
    for layout, cache_name in CACHES.items():
        bs, used, nb = pool(layout, context)
        caches = [layer_cache(layout, nb, bs, g, huge=True) for _ in range(LAYERS)]
        table = torch.randperm(nb, generator=g)[:used]
        q = torch.randn(1, HQ, D, generator=g)
        dense = decode_plan([table], [context], bs, num_blocks=nb)

        def decode(m, caches=caches, q=q, plan=dense) -> torch.Tensor:
            return [m.paged_decode(q, k, v, plan.block_tables, plan.ranges, D**-0.5, None) for k, v, _ in caches][-1]

        ops[f"decode, {cache_name}"] = decode
        if layout == "longserve":
            loki = topk_decode_plan([table], [context], [LokiParams()], num_blocks=nb)

            def topk(m, caches=caches, q=q, plan=loki) -> torch.Tensor:
                return [m.lowrank_topk_decode(q, low, k, v, plan.block_tables, plan.limits, HKV, D**-0.5, None, None)
                        for k, v, low in caches][-1]

            ops[f"Loki's op, {cache_name}"] = topk
    return ops


def linear_ops(rows: list[int]) -> dict[str, Callable]:
    weights = model_weights()
    g = torch.Generator().manual_seed(1)
    ops = {}
    for m in rows:
        xs = {w.shape[1]: torch.randn(m, w.shape[1], generator=g) for w in weights}

        def linear(kernels, xs=xs) -> torch.Tensor:
            return [kernels.linear_rows(xs[w.shape[1]], w, None) for w in weights][-1]

        ops[f"linear layers, {m} row{'s' if m > 1 else ''}"] = linear
    return ops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    builds = {name: cpu_ext.build(flags) for name, flags in BUILDS.items()}
    ops = {**decode_ops(args.context), **linear_ops([1, 4, 8])}
    for op, f in ops.items():
        first, *others = (f(m) for m in builds.values())
        assert all(torch.equal(first, o) for o in others), f"{op}: the builds' outputs differ"
    fns = {(op, name): (lambda f=f, m=m: f(m)) for op, f in ops.items() for name, m in builds.items()}
    with torch.inference_mode():
        times = interleaved_medians(fns, args.repeats)
    print(f"context {args.context}, {torch.get_num_threads()} threads, medians of {args.repeats} interleaved repeats; "
          "outputs bitwise equal")
    print("| reads | prefetch into the first level | into the second (default) | second / first |")
    print("|---|---|---|---|")
    for op in ops:
        one, two = times[op, "first level"], times[op, "second level"]
        per = LAYERS if not op.startswith("linear") else 1  # a layer's time, or a step's
        print(f"| {op} | {one / per * 1e3:.3f} ms | {two / per * 1e3:.3f} ms | {two / one:.3f}x |")


if __name__ == "__main__":
    main()
