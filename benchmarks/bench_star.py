"""Star Attention against `dense` end to end on the embedded model: one process, then two ranks, same run.

    .venv/bin/python benchmarks/bench_star.py [--repeats 3] [--only timing,quality]

- TTFT and TPOT of a 7,500-token prompt (the last 128 tokens the query) + 64 greedy tokens, one request at a
  time, 4,096-token prefill chunks (two 2,048-token blocks, so both ranks work in every chunk):
  dense (1 process, 2 threads), star on one process (2 threads), star over 2 ranks (this process and one
  worker, each pinned to one core, 1 thread). Medians of interleaved repeats; between runs this process
  switches its pinning, the worker idles in its wait for the next step.
- KV blocks each rank holds once the prompt is in (measured on each rank's pool).
- Quality (reported): passkey at 1k/2k/4k (needle at 10/50/90% depth) as a chat whose first user turn is the
  haystack and whose last is the question: the split the server applies to chat (the last user turn on is the
  query). The ranks compute the single-process result (tests/test_star_ranks.py), so quality runs on one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from common import FILLER, passkey_row, random_prompt

from distributed.star_group import StarGroup
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

STAR = {"block_size": 2048}
CONFIG = EngineConfig(max_model_len=8192, kv_cache_memory=1.0, max_num_batched_tokens=4096,
                      enable_prefix_caching=False)


def run_once(engine: LLMEngine, prompt: list[int], star: dict | None, max_tokens: int
             ) -> tuple[float, float, int]:
    """(TTFT, TPOT, blocks rank 0 holds once the prompt is in) of one request running alone."""
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    kw = {"attention_backend": "star", "attention_params": star} if star else {}
    start = time.perf_counter()
    rid = engine.add_request(prompt, sp, **kw)
    first, held = None, 0
    while engine.has_unfinished_requests():
        if engine.step() and first is None:
            first = time.perf_counter()
            held = engine.kv_manager.num_held_blocks(rid)
    end = time.perf_counter()
    return first - start, (end - first) / max(1, max_tokens - 1), held


def held_per_rank(engine: LLMEngine, group: StarGroup, prompt: list[int], star: dict) -> list[int]:
    engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                       attention_backend="star", attention_params=star)
    while not engine.step():  # until the first token: the whole prompt's KV is in
        pass
    held = group.blocks_in_use(engine.usage().used)
    while engine.has_unfinished_requests():
        engine.step()
    return held


def timing(single: LLMEngine, ranked: LLMEngine, group: StarGroup, repeats: int) -> None:
    prompt = random_prompt(7500, 7)
    all_cores = sorted(os.sched_getaffinity(0))
    one_core = [all_cores[0]]
    setups = {"dense (1 process, 2 threads)": (all_cores, single, None),
              "star, 1 process (2 threads)": (all_cores, single, STAR),
              "star, 2 ranks (1 thread each)": (one_core, ranked, STAR),
              "star, 2 ranks, anchor 512": (one_core, ranked, {**STAR, "anchor_size": 512})}
    times: dict[str, list[tuple[float, float, int]]] = {name: [] for name in setups}
    for _ in range(repeats):  # interleaved, so drift hits every setup alike
        for name, (cores, engine, star) in setups.items():
            os.sched_setaffinity(0, cores)
            torch.set_num_threads(len(cores))
            times[name].append(run_once(engine, prompt, star, 64))
    # measured on every rank's pool; the anchor a worker encoded is gone once the context is in
    ranks = {name: held_per_rank(ranked, group, prompt, star) for name, (_, engine, star) in setups.items()
             if engine is ranked}
    block_bytes = single.kv.spec.block_bytes
    base = [statistics.median(t[i] for t in times["dense (1 process, 2 threads)"]) for i in (0, 1)]
    print("\n| 7,500 tokens + 64 | TTFT | vs dense | TPOT | vs dense | KV per rank once the prompt is in (MiB) |")
    print("|---|---|---|---|---|---|")
    for name, ts in times.items():
        ttft, tpot = (statistics.median(t[i] for t in ts) for i in (0, 1))
        kv = (" / ".join(f"{b * block_bytes / 2**20:.1f}" for b in ranks[name]) if name in ranks
              else f"{ts[0][2] * block_bytes / 2**20:.1f}")
        print(f"| {name} | {ttft:.2f} s | {ttft / base[0]:.3f}x | {tpot * 1e3:.1f} ms | {tpot / base[1]:.3f}x | "
              f"{kv} |")


def chat_passkey(engine: LLMEngine, n: int, depth: float, key: int) -> tuple[list[int], int]:
    """A two-turn chat of about `n` tokens (haystack with the needle, then the question) and its query length
    under the server's chat split."""
    tok = engine.tokenizer
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    filler = tok.encode(FILLER * (n // 15 + 1))[: n - 80]
    cut = int(len(filler) * depth)
    haystack = tok.decode(filler[:cut]) + needle + tok.decode(filler[cut:])
    turns = [{"role": "user", "content": haystack},
             {"role": "user", "content": "What is the pass key? Answer with the number only."}]
    ids = tok.encode(tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)
    prefix = tok.encode(tok.apply_chat_template(turns[:1], tokenize=False), add_special_tokens=False)
    assert ids[: len(prefix)] == prefix
    return ids, len(ids) - len(prefix)


def quality(engine: LLMEngine) -> None:
    sp = SamplingParams(temperature=0, max_tokens=12)
    cells = [(n, d, 10000 + 7919 * i) for i, (n, d) in enumerate((n, d) for n in (1000, 2000, 4000)
                                                                   for d in (0.1, 0.5, 0.9))]
    prompts = [chat_passkey(engine, n, d, key) for n, d, key in cells]
    recipes = {"dense": None, "star (block 2048)": {"block_size": 2048},
               "star (block 1024)": {"block_size": 1024}, "star (block 512)": {"block_size": 512},
               "star (block 512, anchor 128)": {"block_size": 512, "anchor_size": 128}}
    print("\n| recipe | passkey 1k (10/50/90%) | 2k | 4k | total |")
    print("|---|---|---|---|---|")
    for name, params in recipes.items():
        hits = []
        for (ids, query), (_, _, key) in zip(prompts, cells):
            kw = {} if params is None else {"attention_backend": "star",
                                            "attention_params": {**params, "query_tokens": query}}
            hits.append(str(key) in engine.generate([ids], sp, **kw)[0].text)
        passkey_row(name, hits)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", default="timing,quality")
    args = ap.parse_args()
    single = LLMEngine(CONFIG)
    if "quality" in args.only:
        quality(single)
    if "timing" not in args.only:
        return
    group = StarGroup.launch(CONFIG, 2, timeout=600)
    try:
        ranked = LLMEngine(CONFIG, loaded=single.loaded, hooks=[group])
        for engine in (single, ranked):  # warm-up
            engine.generate([random_prompt(4500, 0)], SamplingParams(max_tokens=2), attention_backend="star",
                            attention_params=STAR)
        timing(single, ranked, group, args.repeats)
    finally:
        group.shutdown()


if __name__ == "__main__":
    main()
