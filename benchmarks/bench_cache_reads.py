"""Reading per-head slots from a paged cache: the kernel layer's row gather against indexing three dimensions
(the obvious stride-agnostic form), on longserve's contiguous cache and on a vLLM-like strided one (K and V
fused per cell, head-major). Medians of the repeats, in the same process.

    .venv/bin/python benchmarks/bench_cache_reads.py [--repeats 50]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import ROOT  # noqa: F401  (puts the repository on sys.path)

from attention_backends.kernels.paged import gather_head_slots

BLOCKS, BS, HKV, D = 3000, 16, 3, 64  # the embedded model's geometry, ~48k tokens per layer


def median_us(fns: list, repeats: int, *args) -> list[float]:
    times: list[list[float]] = [[] for _ in fns]
    for fn in fns:
        fn(*args)
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn(*args)
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) * 1e6 for ts in times]


def three_dim_indexing(kc: torch.Tensor, vc: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    heads = torch.arange(kc.shape[2]).unsqueeze(1)
    return kc[slots // BS, slots % BS, heads], vc[slots // BS, slots % BS, heads]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    cells = torch.randn(BLOCKS, HKV, BS, 2 * D, generator=g)
    layouts = {"contiguous": (torch.randn(BLOCKS, BS, HKV, D, generator=g),) * 2,
               "vLLM-like (strided)": (cells[..., :D].transpose(1, 2), cells[..., D:].transpose(1, 2))}
    print("\n| cache layout | slots per KV head | row gather (kernels/paged.py) | three-dim indexing | ratio |")
    print("|---|---|---|---|---|")
    for name, (kc, vc) in layouts.items():
        for n in (2048, 16384):
            slots = torch.randint(0, BLOCKS * BS, (HKV, n), generator=g)
            ours, plain = median_us([gather_head_slots, three_dim_indexing], args.repeats, kc, vc, slots)
            print(f"| {name} | {n} | {ours:.0f} us | {plain:.0f} us | {plain / ours:.1f}x |")


if __name__ == "__main__":
    main()
