"""Loki and TCA-Attention against `dense` end to end on the embedded model, same process and engine.

    .venv/bin/python benchmarks/bench_sparse_kv.py [--repeats 3] [--only timing,kv,quality]

- TTFT and TPOT of a 7,500-token prompt + 128 greedy tokens, one request at a time, prefill in the
  server's 2,048-token chunks, prefix cache off; medians of interleaved repeats. Targets (issue 5): Loki
  TPOT <= 0.8x dense; TCA TTFT reported. TCA runs at three calibration tolerances (0.01 is its default).
- KV retained: the blocks the request holds after its last step, and their bytes. Target: TCA <= 0.5x.
- Quality (reported): passkey at 1k/2k/4k (needle at 10/50/90% depth), greedy agreement at 4k.
Calibration artifacts are made on first use (the bundled text) if the cache has none.
One layer's decode attention time on synthetic tensors is `bench_attention_layer.py --backend loki|tca`.
"""

from __future__ import annotations

import argparse
import re

from common import backend_kwargs, quality_tables, random_prompt, timing_table

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

RECIPES = {
    "dense": None,
    "loki (k 0.25, d 0.25, no sinks or local window: the paper's rule)": ("loki", dict(k_frac=0.25, d_frac=0.25,
                                                                                      sinks=0, local_window=0)),
    "loki (k 0.25, d 0.25, 64 sinks, 256 local: the default)": ("loki", dict(k_frac=0.25, d_frac=0.25)),
    "tca (tolerance 0.01, 4 local blocks)": ("tca", dict(tolerance=0.01, local_blocks=4)),
    "tca (tolerance 0.05, 4 local blocks)": ("tca", dict(tolerance=0.05, local_blocks=4)),
    "tca (tolerance 0.1, 4 local blocks)": ("tca", dict(tolerance=0.1, local_blocks=4)),
}
TARGETS = {name: "TPOT <= 0.8x" for name in RECIPES if name.startswith("loki")}


def held_at_end(engine: LLMEngine, prompt: list[int], recipe) -> int:
    rid = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=128, ignore_eos=True),
                             **backend_kwargs(recipe))
    held = 0
    while engine.has_unfinished_requests():
        engine.step()
        if engine.has_unfinished_requests():
            held = engine.kv_manager.num_held_blocks(rid)
    return held


def bench_kv(engine: LLMEngine) -> None:
    prompt = random_prompt(7500, 2)
    block_bytes = engine.kv.spec.block_bytes
    dense = held_at_end(engine, prompt, None)
    print("\n| KV held after 7,500 + 127 tokens | blocks | MiB | vs dense | target |")
    print("|---|---|---|---|---|")
    for name, recipe in RECIPES.items():
        held = dense if recipe is None else held_at_end(engine, prompt, recipe)
        target = "<= 0.50x" if name.startswith("tca") else ""
        print(f"| {name} | {held} | {held * block_bytes / 2**20:.1f} | {held / dense:.3f}x | {target} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", default="timing,kv,quality")
    ap.add_argument("--recipes", default="", help="regex on recipe names (default: all); dense always runs")
    args = ap.parse_args()
    for name in [n for n in RECIPES if n != "dense" and not re.search(args.recipes, n)]:
        del RECIPES[name]
    engine = LLMEngine(EngineConfig(max_model_len=8192, kv_cache_memory=1.0, max_num_batched_tokens=2048,
                                    enable_prefix_caching=False))
    for recipe in RECIPES.values():  # warm-up, and calibration on first use outside the timed runs
        engine.generate([random_prompt(512, 0)], SamplingParams(max_tokens=2), **backend_kwargs(recipe))
    if "timing" in args.only:
        timing_table(engine, RECIPES, 7500, 128, args.repeats, TARGETS)
    if "kv" in args.only:
        bench_kv(engine)
    if "quality" in args.only:
        quality_tables(engine, RECIPES)


if __name__ == "__main__":
    main()
