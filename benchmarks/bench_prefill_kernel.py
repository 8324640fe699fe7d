"""One layer's prefill attention on the embedded model's geometry (9 query heads, 3 KV heads, head_dim 64, float32,
16-token blocks in shuffled order): each chunk a server runs for a 7,680-token prompt with 2,048-token chunks, and a
1,024-token prompt, through the PyTorch reference op (torch's flash attention: the chunk's own keys causally,
cached context without a mask, merged by log-sum-exps) and the C++ kernel (`csrc/paged_prefill.cpp`, everything read
from the paged cache in place), in the same process, interleaved; medians of the repeats, the ratio to the
reference, and the attention's arithmetic rate (4 * heads * head_dim flops per visible query-key pair). Issue 19's
TTFT targets rest on prefill, half of which is attention at 7.7k. `--engine` measures instead the time to the first
token of whole prompts in one engine with the server's settings, stepped on a thread of its own as the server steps
it, the two kernels' turns alternating (each step plans for the kernel `LONGSERVE_KERNELS` names when it starts).

    .venv/bin/python benchmarks/bench_prefill_kernel.py [--repeats 7] [--chunks 0:1024,0:2048,...]
    .venv/bin/python benchmarks/bench_prefill_kernel.py --engine [--prompts 1024,7680] [--repeats 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading

import torch
from bench_decode_kernel import HKV, HQ, D, interleaved_medians
from common import random_prompt, timed_request

from attention_backends.kernels.prefill import paged_prefill, prefill_plan

BS = 16
CHUNKS = "0:1024,0:2048,2048:2048,4096:2048,6144:1536"  # start:length


def attention_flops(heads: int, head_dim: int, start: int, length: int) -> float:
    """Causal attention's FLOPs for `length` queries after `start` cached keys: 4 * heads * head_dim per visible
    query-key pair (scores and values, a multiply and an add each)."""
    return 4 * heads * head_dim * (length * start + length * (length + 1) / 2)


def engine_ttft(prompts: list[int], repeats: int) -> None:
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine

    times: dict[tuple[int, str], list[float]] = {}

    def run() -> None:
        engine = LLMEngine(EngineConfig(max_model_len=8192, kv_cache_memory=2.0, max_num_batched_tokens=2048))
        timed_request(engine, random_prompt(512, 0), None, 1)
        for rep in range(repeats):
            for n in prompts:
                for kernels in ("torch", "auto") if rep % 2 == 0 else ("auto", "torch"):
                    os.environ["LONGSERVE_KERNELS"] = kernels
                    ttft, _ = timed_request(engine, random_prompt(n, 1000 * rep + n + (kernels == "auto")), None, 1)
                    times.setdefault((n, kernels), []).append(ttft)

    thread = threading.Thread(target=run)  # as the server steps it: not on the main thread
    thread.start()
    thread.join()
    print(f"{torch.get_num_threads()} threads, medians of {repeats}")
    print("| prompt tokens | TTFT, torch flash | TTFT, C++ kernel | ratio | paired difference |")
    print("|---|---|---|---|---|")
    for n in prompts:
        ref, cpp = times[n, "torch"], times[n, "auto"]
        paired = statistics.median(b - a for a, b in zip(ref, cpp))
        print(f"| {n:,} | {statistics.median(ref):.2f} s | {statistics.median(cpp):.2f} s | "
              f"{statistics.median(cpp) / statistics.median(ref):.2f}x | {paired:+.2f} s |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--chunks", default=CHUNKS, help="start:length of each chunk, comma-separated")
    ap.add_argument("--engine", action="store_true", help="whole prompts' TTFT in one engine instead")
    ap.add_argument("--prompts", default="1024,7680", help="with --engine: prompt lengths, comma-separated")
    args = ap.parse_args()
    if args.engine:
        engine_ttft([int(n) for n in args.prompts.split(",")], args.repeats)
        return
    g = torch.Generator().manual_seed(0)
    chunks = [tuple(int(x) for x in c.split(":")) for c in args.chunks.split(",")]
    longest = max(start + length for start, length in chunks)
    used = -(-longest // BS)
    nb = used + used // 4  # a pool with free blocks, so the table's ids are scattered
    k_cache, v_cache = torch.randn(2, nb, BS, HKV, D, generator=g)
    table = torch.randperm(nb, generator=g)[:used]
    print(f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print("| chunk (cached + new) | torch flash | C++ kernel | C++ / torch | GFLOPS torch / C++ | max abs diff |")
    print("|---|---|---|---|---|---|")
    totals = {"torch": 0.0, "cpp": 0.0}
    for start, length in chunks:
        q = torch.randn(length, HQ, D, generator=g).transpose(0, 1)  # [H_q, T, D] as the model's view of it
        fresh = tuple(c[table].flatten(0, 1)[start : start + length].transpose(0, 1) for c in (k_cache, v_cache))
        ops, outs = {}, {}
        for kernels in ("torch", "cpp"):
            os.environ["LONGSERVE_KERNELS"] = kernels  # read when planning: each plan keeps its kernel
            plan = prefill_plan(start, length)
            outs[kernels] = paged_prefill(q, k_cache, v_cache, table, plan, D**-0.5, fresh)
            ops[kernels] = lambda plan=plan, q=q, fresh=fresh: paged_prefill(q, k_cache, v_cache, table, plan, D**-0.5,
                                                                              fresh)
        medians = interleaved_medians(ops, args.repeats)
        for name, t in medians.items():
            totals[name] += t
        flops = attention_flops(HQ, D, start, length)
        diff = (outs["cpp"] - outs["torch"]).abs().max().item()
        t_ref, t_cpp = medians["torch"], medians["cpp"]
        print(f"| {start:,} + {length:,} | {t_ref * 1e3:.1f} ms | {t_cpp * 1e3:.1f} ms | {t_cpp / t_ref:.2f}x | "
              f"{flops / t_ref / 1e9:.0f} / {flops / t_cpp / 1e9:.0f} | {diff:.1e} |")
    print(f"| all | {totals['torch'] * 1e3:.1f} ms | {totals['cpp'] * 1e3:.1f} ms | "
          f"{totals['cpp'] / totals['torch']:.2f}x | | |")


if __name__ == "__main__":
    main()
