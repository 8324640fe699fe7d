"""One layer's decode attention at 8k on the embedded model's geometry (9 query heads, 3 KV heads, head_dim 64,
float32, 16-token blocks in shuffled order, as in a server after a few requests): the PyTorch reference op (gather
the blocks, SDPA) against the C++ CPU kernel (reads K/V in place), in the same process; medians of the repeats,
and the K/V bytes read per second. Each repeat runs every one of `--layers` layers' caches in turn, as a decode
step does, so K/V come from memory rather than the last level cache (one layer's 12 MB at 8k would fit in it).
Target (issue 19): >= 10 GB/s.

    .venv/bin/python benchmarks/bench_decode_kernel.py [--context 8192] [--layers 30] [--repeats 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from common import ROOT  # noqa: F401  (puts the repository on sys.path)

from attention_backends.kernels.decode import decode_plan, paged_decode

BS, HKV, D, HQ = 16, 3, 64, 9


def median_s(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=30, help="the embedded model has 30")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    used = -(-args.context // BS)
    nb = used + used // 4  # a pool with free blocks, so the table's ids are scattered
    caches = [torch.randn(2, nb, BS, HKV, D, generator=g) for _ in range(args.layers)]
    table = torch.randperm(nb, generator=g)[:used]
    q = torch.randn(1, HQ, D, generator=g)
    nbytes = 2 * args.context * HKV * D * 4
    rows, outs = [], {}
    for kernels in ("torch", "cpp"):
        os.environ["LONGSERVE_KERNELS"] = kernels
        plan = decode_plan([table], [args.context], BS, num_blocks=nb)
        outs[kernels] = paged_decode(q, *caches[0], plan, D**-0.5)

        def step(p=plan) -> None:
            for k, v in caches:
                paged_decode(q, k, v, p, D**-0.5)

        rows.append((kernels, median_s(step, args.repeats) / args.layers))
    err = (outs["cpp"] - outs["torch"]).abs().max().item()
    print(f"context {args.context}, {args.layers} layers in turn, {torch.get_num_threads()} threads, "
          f"max |cpp - torch| = {err:.2e}")
    print("| kernels | time per layer | vs reference | K/V read |")
    print("|---|---|---|---|")
    for name, t in rows:
        print(f"| {name} | {t * 1e3:.2f} ms | {t / rows[0][1]:.3f}x | {nbytes / t / 1e9:.1f} GB/s |")


if __name__ == "__main__":
    main()
