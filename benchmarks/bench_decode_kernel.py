"""One layer's decode attention at 8k on the embedded model's geometry (9 query heads, 3 KV heads, head_dim 64,
float32, blocks in shuffled order, as in a server after a few requests): dense decode and Loki's top-k decode
(`lowrank_topk_decode`, its defaults: k 0.25, d 0.25, 64 sinks, 256 local tokens), each through the PyTorch
reference ops and the C++ CPU kernels, in the same process; medians of the repeats, the ratio to the dense
reference, and for dense the K/V bytes read per second. Each repeat runs every one of `--layers` layers' caches in
turn, as a decode step does, so K/V come from memory rather than the last level cache (one layer's 12 MB at 8k would
fit in it). `--layout vllm-cpu` reads vLLM's CPU cache (32-token pages, keys stored transposed; Loki scores the
first d rows of each page's keys), `--layout vllm-rows` the same pages with keys stored row by row. The C++ kernels
run twice, on the same caches on 4 KiB and on 2 MiB pages (`huge_pages.py`, how both hosts hold their caches).
Targets: dense >= 10 GB/s (issue 19); Loki's share of dense's time is what its TPOT target rests on (issue 17).

    .venv/bin/python benchmarks/bench_decode_kernel.py [--context 8192] [--layers 30] [--repeats 20]
        [--layout longserve|vllm-cpu|vllm-rows] [--block-size 16]
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
from attention_backends.kernels.huge_pages import zeros
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


def pool(layout: str, context: int, block_size: int | None = None) -> tuple[int, int, int]:
    """(block size, blocks a sequence of `context` tokens uses, blocks in the pool) for `layout`'s cache: a pool with
    free blocks, so that a shuffled table's ids are scattered. The block size is the layout's own (longserve 16,
    vLLM 32) unless one is given."""
    bs = block_size or (16 if layout == "longserve" else 32)
    used = -(-context // bs)
    return bs, used, used + used // 4


def layer_cache(layout: str, nb: int, bs: int, g: torch.Generator, huge: bool = False) -> tuple[torch.Tensor, ...]:
    """(k_cache, v_cache, low-rank keys) of one layer in `layout`; `huge`: on 2 MiB pages (`huge_pages.py`)."""
    def placed(x: torch.Tensor) -> torch.Tensor:  # a contiguous copy, on 2 MiB pages if `huge`
        return zeros(x.shape, x.dtype, x.device).copy_(x) if huge else x.contiguous()

    rank = LokiParams().rank(D)
    if layout == "longserve":
        k, v = placed(torch.randn(2, nb, bs, HKV, D, generator=g))
        # longserve keeps Loki's low-rank keys in a table of their own, each block's channels one after the other
        return k, v, placed(k[..., :rank].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    cells = placed(torch.randn(nb, HKV, bs, 2 * D, generator=g))
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
    ap.add_argument("--block-size", type=int, help="tokens a block (default: the layout's, 16 or 32)")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    bs, used, nb = pool(args.layout, args.context, args.block_size)
    # The same caches on 4 KiB and on 2 MiB pages
    caches = {huge: [layer_cache(args.layout, nb, bs, filler, huge) for _ in range(args.layers)]
              for huge, filler in ((False, torch.Generator().manual_seed(1)), (True, torch.Generator().manual_seed(1)))}
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
            for huge in (False, True) if kernels == "cpp" else (False,):
                outs[name, kernels, huge] = op(*caches[huge][0])
                steps[name, kernels, huge] = lambda op=op, huge=huge: [op(*cache) for cache in caches[huge]]
    medians = interleaved_medians(steps, args.repeats)
    errs = ", ".join(f"{name} " + " / ".join(f"{(outs[name, 'cpp', huge] - outs[name, 'torch', False]).abs().max():.1e}"
                                             for huge in (False, True)) for name in ("dense", "loki"))
    print(f"context {args.context}, layout {args.layout}, {bs}-token blocks, {args.layers} layers in turn, "
          f"{torch.get_num_threads()} threads, max |cpp - torch| on 4 KiB / 2 MiB pages: {errs}")
    print("| op | kernels | pages | time per layer | vs dense reference | vs 4 KiB pages | K/V read |")
    print("|---|---|---|---|---|---|---|")
    base = medians["dense", "torch", False]
    for (name, kernels, huge), t in medians.items():
        rate = f"{nbytes * args.layers / t / 1e9:.1f} GB/s" if name == "dense" else ""
        small = f"{t / medians[name, kernels, False]:.3f}x" if huge else ""
        print(f"| {name} | {kernels} | {'2 MiB' if huge else '4 KiB'} | {t / args.layers * 1e3:.3f} ms | "
              f"{t / base:.3f}x | {small} | {rate} |")


if __name__ == "__main__":
    main()
