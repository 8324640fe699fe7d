"""Where one engine step's time goes: `torch.profiler` over decode steps of one request (or several at once) on the
embedded model, after a prefill of `--context` tokens, with the server's engine settings. Prints the median step
time, the ops that cost most, and the time outside the model's forward (planning, sampling, bookkeeping).

    .venv/bin/python benchmarks/profile_step.py [--context 1024] [--seqs 1] [--steps 16] [--backend dense]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import ROOT  # noqa: F401  (puts the repository on sys.path)
from torch.profiler import ProfilerActivity, profile, record_function

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--seqs", type=int, default=1)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--backend", default="dense")
    ap.add_argument("--rows", type=int, default=25, help="ops in the table")
    args = ap.parse_args()

    engine = LLMEngine(EngineConfig(max_model_len=8192, kv_cache_memory=2.0, max_num_batched_tokens=2048,
                                    attention_backend=args.backend))
    g = torch.Generator().manual_seed(0)
    sp = SamplingParams(temperature=0, max_tokens=3 * args.steps + 8, ignore_eos=True)
    for _ in range(args.seqs):
        engine.add_request(torch.randint(100, 40000, (args.context,), generator=g).tolist(), sp)
    while any(s.num_output_tokens == 0 for s in engine.requests.values()):  # prefills
        engine.step()
    for _ in range(args.steps):  # warm up the decode path
        engine.step()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    forward = engine.runner.model.forward
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        def timed_forward(*a, **kw):
            with record_function("model.forward"):
                return forward(*a, **kw)

        engine.runner.model.forward = timed_forward
        for _ in range(args.steps):
            with record_function("engine.step"):
                engine.step()
        engine.runner.model.forward = forward
    events = {e.key: e for e in prof.key_averages()}
    step_us, fwd_us = events["engine.step"].cpu_time_total, events["model.forward"].cpu_time_total
    print(f"context {args.context}, {args.seqs} sequence(s), backend {args.backend}, {torch.get_num_threads()} threads")
    print(f"step: median {statistics.median(times) * 1e3:.1f} ms unprofiled; profiled {step_us / args.steps / 1e3:.1f}"
          f" ms, of which the model's forward {fwd_us / args.steps / 1e3:.1f} ms and the rest "
          f"{(step_us - fwd_us) / args.steps / 1e3:.1f} ms")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
