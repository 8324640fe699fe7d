"""InfLLM-V2 (`infllm_v2`) against `dense` end to end on the embedded model, same process and engine.

    .venv/bin/python benchmarks/bench_infllm.py [--repeats 3] [--only timing,quality]

- TTFT and TPOT of a 7,500-token prompt + 128 greedy tokens, one request at a time (prefix cache off, the
  whole prompt in one step), medians of interleaved repeats, with `dense_len` 2048.
- Quality (reported): passkey at 1k/2k/4k (needle at 10/50/90% depth), greedy agreement at 4k.
One layer's attention time on synthetic tensors is `bench_attention_layer.py --backend infllm_v2`.
"""

from __future__ import annotations

import argparse

from common import quality_tables, random_prompt, timing_table

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

RECIPES = {
    "dense": None,
    "infllm_v2 recipe (dense_len 2048, topk 16, 8 local)": ("infllm_v2", dict(dense_len=2048, topk=16,
                                                                              local_blocks=8)),
    "infllm_v2 published (dense_len 2048, topk 64, 32 local)": ("infllm_v2", dict(dense_len=2048)),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", default="timing,quality")
    args = ap.parse_args()
    engine = LLMEngine(EngineConfig(max_model_len=8192, kv_cache_memory=1.0, max_num_batched_tokens=8192,
                                    enable_prefix_caching=False))
    engine.generate([random_prompt(512, 0)], SamplingParams(max_tokens=1))  # warm-up
    if "timing" in args.only:
        timing_table(engine, RECIPES, 7500, 128, args.repeats, {})
    if "quality" in args.only:
        quality_tables(engine, RECIPES)


if __name__ == "__main__":
    main()
