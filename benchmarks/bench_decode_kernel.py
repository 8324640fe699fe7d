"""One layer's decode attention at 8k on the embedded model's geometry (9 query heads, 3 KV heads, head_dim 64,
float32, blocks in shuffled order, as in a server after a few requests): dense decode and Loki's top-k decode
(`lowrank_topk_decode`, its defaults: k 0.25, d 0.25, 64 sinks, 256 local tokens), each through the PyTorch
reference ops and the C++ CPU kernels, in the same process; medians of the repeats, the ratio to the dense
reference, and for dense the K/V bytes read per second. Each repeat runs every one of `--layers` layers' caches in
turn, as a decode step does, so K/V come from memory rather than the last level cache (one layer's 12 MB at 8k would
fit in it). `--layout vllm-cpu` reads vLLM's CPU cache (32-token pages, keys stored transposed; Loki scores the
first d rows of each page's keys), `--layout vllm-rows` the same pages with keys stored row by row.
Targets: dense >= 10 GB/s (issue 19); Loki's share of dense's time is what its TPOT target rests on (issue 17).

    .venv/bin/python benchmarks/bench_decode_kernel.py [--context 8192] [--layers 30] [--repeats 20]
        [--layout longserve|vllm-cpu|vllm-rows]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from common import ROOT  # noqa: F401  (puts the repository on sys.path)

from attention_backends.kernels.decode import decode_plan, paged_decode
from attention_backends.kernels.topk import lowrank_topk_decode, topk_decode_plan
from attention_backends.loki import LokiParams
from longserve_vllm.layout import cache_views

HKV, D, HQ = 3, 64, 9


def interleaved_medians(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, run in turn within every repeat: on a noisy machine the ratios then compare
    neighbouring measurements."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def layer_cache(layout: str, nb: int, bs: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """(k_cache, v_cache, low-rank keys) of one layer in `layout`."""
    rank = LokiParams().rank(D)
    if layout == "longserve":
        k, v = torch.randn(2, nb, bs, HKV, D, generator=g)
        # longserve keeps Loki's low-rank keys in a table of their own, each block's channels one after the other
        return k, v, k[..., :rank].permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    cells = torch.randn(nb, HKV, bs, 2 * D, generator=g)
    if layout == "vllm-cpu":
        k, v = cache_views(cells, D, "vec")
    else:  # each (page, head): its keys row by row, then its values
        k, v = (half.unflatten(-1, (bs, D)).transpose(1, 2) for half in cells.view(nb, HKV, 2, bs * D).unbind(2))
    return k, v, k[..., :rank]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=30, help="the embedded model has 30")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--layout", choices=["longserve", "vllm-cpu", "vllm-rows"], default="longserve")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    bs = 16 if args.layout == "longserve" else 32
    used = -(-args.context // bs)
    nb = used + used // 4  # a pool with free blocks, so the table's ids are scattered
    caches = [layer_cache(args.layout, nb, bs, g) for _ in range(args.layers)]
    table = torch.randperm(nb, generator=g)[:used]
    q = torch.randn(1, HQ, D, generator=g)
    nbytes = 2 * args.context * HKV * D * 4
    steps, outs = {}, {}
    for kernels in ("torch", "cpp"):
        os.environ["LONGSERVE_KERNELS"] = kernels  # read when planning: each plan keeps its kernel
        dense = decode_plan([table], [args.context], bs, num_blocks=nb)
        loki = topk_decode_plan([table], [args.context], [LokiParams()], num_blocks=nb)
        ops = {"dense": lambda k, v, low, p=dense: paged_decode(q, k, v, p, D**-0.5),
               "loki": lambda k, v, low, p=loki: lowrank_topk_decode(q, low, k, v, p, HKV, D**-0.5)}
        for name, op in ops.items():
            outs[name, kernels] = op(*caches[0])
            steps[name, kernels] = lambda op=op: [op(*cache) for cache in caches]
    medians = interleaved_medians(steps, args.repeats)
    rows = [(name, kernels, t / args.layers) for (name, kernels), t in medians.items()]
    errs = ", ".join(f"{name} {(outs[name, 'cpp'] - outs[name, 'torch']).abs().max().item():.1e}"
                     for name in ("dense", "loki"))
    print(f"context {args.context}, layout {args.layout}, {args.layers} layers in turn, {torch.get_num_threads()} "
          f"threads, max |cpp - torch|: {errs}")
    print("| op | kernels | time per layer | vs dense reference | K/V read |")
    print("|---|---|---|---|---|")
    base = rows[0][2]
    for name, kernels, t in rows:
        rate = f"{nbytes / t / 1e9:.1f} GB/s" if name == "dense" else ""
        print(f"| {name} | {kernels} | {t * 1e3:.3f} ms | {t / base:.3f}x | {rate} |")


if __name__ == "__main__":
    main()
