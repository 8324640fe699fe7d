"""What the backend benchmarks share: prompts, per-request timing, and the quality tables against dense.

A recipe is `(attention_backend, attention_params)`; `None` stands for `dense`.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import torch  # noqa: E402
from conftest import natural_text  # noqa: E402

from engine.llm_engine import LLMEngine  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402

Recipe = tuple[str, dict] | None
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def backend_kwargs(recipe: Recipe) -> dict:
    return {} if recipe is None else {"attention_backend": recipe[0], "attention_params": recipe[1]}


def random_prompt(n: int, seed: int) -> list[int]:
    return torch.randint(100, 40000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def timed_request(engine: LLMEngine, prompt: list[int], recipe: Recipe, max_tokens: int) -> tuple[float, float]:
    """(TTFT, TPOT) in seconds of one request running alone."""
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    engine.add_request(prompt, sp, **backend_kwargs(recipe))
    first = None
    while engine.has_unfinished_requests():
        if engine.step() and first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return first - start, (end - first) / max(1, max_tokens - 1)


def timing_table(engine: LLMEngine, recipes: dict[str, Recipe], n: int, max_tokens: int, repeats: int,
                 targets: dict[str, str]) -> None:
    """TTFT and TPOT of an `n`-token prompt per recipe, medians of interleaved repeats, ratios to the first."""
    prompt = random_prompt(n, n)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in recipes}
    for _ in range(repeats):  # interleaved, so drift hits every recipe alike
        for name, recipe in recipes.items():
            times[name].append(timed_request(engine, prompt, recipe, max_tokens))
    first = next(iter(recipes))
    base = [statistics.median(t[i] for t in times[first]) for i in (0, 1)]
    print(f"\n| {n} tokens + {max_tokens} | TTFT | vs {first} | TPOT | vs {first} | target |")
    print("|---|---|---|---|---|---|")
    for name, ts in times.items():
        ttft, tpot = (statistics.median(t[i] for t in ts) for i in (0, 1))
        print(f"| {name} | {ttft:.2f} s | {ttft / base[0]:.3f}x | {tpot * 1e3:.1f} ms | {tpot / base[1]:.3f}x | "
              f"{targets.get(name, '')} |")


def passkey_prompt(engine: LLMEngine, n: int, depth: float, key: int) -> list[int]:
    tok = engine.tokenizer
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    question = "What is the pass key? Answer with the number only."
    filler = tok.encode(FILLER * (n // 15 + 1))
    frame = len(tok.encode(tok.apply_chat_template([{"role": "user", "content": needle + question}],
                                                   tokenize=False, add_generation_prompt=True),
                           add_special_tokens=False))
    body = filler[: max(0, n - frame)]
    cut = int(len(body) * depth)
    text = tok.decode(body[:cut]) + needle + tok.decode(body[cut:]) + "\n" + question
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                              add_generation_prompt=True), add_special_tokens=False)


def passkey_row(name: str, hits: list[bool]) -> None:
    """One row of the passkey table: hits at 1k/2k/4k, 3 depths each, and the total."""
    by_len = ["".join("Y" if h else "." for h in hits[i : i + 3]) for i in (0, 3, 6)]
    print(f"| {name} | {by_len[0]} | {by_len[1]} | {by_len[2]} | {sum(hits)}/9 |")


def quality_tables(engine: LLMEngine, recipes: dict[str, Recipe]) -> None:
    """Passkey retrieval at 1k/2k/4k (needle at 10/50/90% depth), and greedy agreement with dense over 64
    tokens continuing natural text at 4k."""
    sp = SamplingParams(temperature=0, max_tokens=12)
    cells = [(n, d, 10000 + 7919 * i) for i, (n, d) in enumerate((n, d) for n in (1000, 2000, 4000)
                                                                   for d in (0.1, 0.5, 0.9))]
    prompts = [passkey_prompt(engine, n, d, key) for n, d, key in cells]
    print("\n| recipe | passkey 1k (10/50/90%) | 2k | 4k | total |")
    print("|---|---|---|---|---|")
    for name, recipe in recipes.items():
        outs = engine.generate(prompts, sp, **backend_kwargs(recipe))
        passkey_row(name, [str(key) in o.text for (_, _, key), o in zip(cells, outs)])

    text = engine.tokenizer.encode(natural_text(400, 11))[:4000]
    sp = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    ref = engine.generate([text], sp)[0].token_ids
    print("\n| recipe | greedy tokens equal to dense before the first difference (of 64) | positions equal |")
    print("|---|---|---|")
    for name, recipe in recipes.items():
        if recipe is None:
            continue
        got = engine.generate([text], sp, **backend_kwargs(recipe))[0].token_ids
        first = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), 64)
        print(f"| {name} | {first} | {sum(a == b for a, b in zip(got, ref))}/64 |")
