"""`python -m loadtest` / `longserve-loadtest`: long-context prompts with needles against an OpenAI-compatible
server; latency with `vllm bench serve` definitions and answer accuracy, per served model, side by side."""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
import zlib
from pathlib import Path

import httpx

from loadtest.metrics import accuracy, parse_slo, summarize
from loadtest.report import (
    console_table,
    plot_accuracy_heatmap,
    plot_latency_cdf,
    plot_ttft_vs_length,
    write_csv,
    write_json,
)
from loadtest.runner import Job, check_target, run_jobs
from loadtest.scoring import score
from loadtest.tokens import LocalTokenizer, ServerTokenizer
from loadtest.workloads import build, make_task, short_samples


def _csv(kind):
    return lambda s: [kind(x) for x in s.split(",") if x]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="longserve-loadtest", description=__doc__)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000")
    ap.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    ap.add_argument("--models", type=_csv(str), default=None, help="served model names (default: all listed)")
    ap.add_argument("--tasks", type=_csv(str), default=["passkey", "niah"],
                    help="passkey, niah (noise haystack), niah_text, vt, kv, short (factual questions under 64 "
                         "tokens, scored against --reference-model's answers)")
    ap.add_argument("--reference-model", default=None,
                    help="whose answers the short questions are scored against (default: the first model)")
    ap.add_argument("--num-keys", type=int, default=1, help="niah: keys in the haystack (the others are decoys)")
    ap.add_argument("--num-values", type=int, default=1, help="niah: values per key, all asked for")
    ap.add_argument("--lengths", type=_csv(int), default=[1000, 2000, 4000], help="prompt tokens")
    ap.add_argument("--depths", type=_csv(float), default=[0.1, 0.5, 0.9])
    ap.add_argument("--offsets", type=_csv(int), default=[],
                    help="also needles at these exact haystack token offsets (KV-block or window edges)")
    ap.add_argument("--samples", type=int, default=1, help="prompts per (task, length, depth)")
    ap.add_argument("--num-prompts", type=int, default=None, help="cap on requests in all")
    ap.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s; inf: all at once")
    ap.add_argument("--burstiness", type=float, default=1.0, help="gamma shape: 1 Poisson, <1 burstier")
    ap.add_argument("--max-concurrency", type=int, default=1, help="requests in flight (closed loop)")
    ap.add_argument("--time-limit", type=float, default=3600.0, help="seconds; unfinished requests are cancelled")
    ap.add_argument("--timeout", type=float, default=600.0, help="per-request seconds")
    ap.add_argument("--slo", default=None, help="goodput SLOs, e.g. ttft:2000,tpot:100 (ms)")
    ap.add_argument("--tokenizer", default=None, help="local HF tokenizer dir (default: the server's /tokenize)")
    ap.add_argument("--out", default="loadtest-results")
    ap.add_argument("--seed", type=int, default=None,
                    help="prompt seed (default: from the clock, so a rerun does not hit the prefix cache)")
    ap.add_argument("--allow-remote", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def make_jobs(args: argparse.Namespace, models: list[str], tok) -> list[Job]:
    placements = [(f"{d:g}", d, None) for d in args.depths] + [(f"@{o}", None, o) for o in args.offsets]
    jobs = []
    for task in args.tasks:
        if task == "short":
            jobs += [Job(m, sample, "-") for sample in short_samples(tok) for m in models]
            continue
        for n in args.lengths:
            for label, depth, offset in placements:
                for k in range(args.samples):
                    rng = random.Random(zlib.crc32(f"{args.seed}/{task}/{n}/{label}/{k}".encode()))
                    t = make_task(task, rng, args.num_keys, args.num_values)
                    sample = build(tok, t, n, depth=depth, offset=offset, rng=rng)
                    jobs += [Job(m, sample, label) for m in models]  # the same prompt for every model
    return jobs[: args.num_prompts] if args.num_prompts else jobs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.seed is None:
        args.seed = int(time.time())
    check_target(args.base_url, args.allow_remote)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    card = httpx.get(f"{args.base_url}/v1/models", headers=headers, timeout=30).json()["data"]
    models = args.models or [m["id"] for m in card]
    tok = LocalTokenizer(args.tokenizer) if args.tokenizer else ServerTokenizer(args.base_url, models[0], args.api_key)
    jobs = make_jobs(args, models, tok)
    results, duration = asyncio.run(run_jobs(args.base_url, jobs, args.request_rate, args.burstiness,
                                             args.max_concurrency, args.time_limit, args.timeout, args.api_key,
                                             args.seed, not args.no_progress))
    reference = args.reference_model or models[0]
    said = {id(j.sample): r.text.strip() for j, r in zip(jobs, results) if j.model == reference and r.ok}
    rows = []
    for job, r in zip(jobs, results):
        s = job.sample
        if s.task == "short":  # the reference model's answer, word for word
            correct = r.ok and id(s) in said and r.text.strip() == said[id(s)]
        else:
            correct = r.ok and score(s.task, s.answers, r.text)
        rows.append({"model": job.model, "task": s.task, "target_tokens": s.target_tokens,
                     "prompt_tokens": r.prompt_tokens or s.prompt_tokens, "depth_target": job.depth_label,
                     "depth": round(s.depth, 4), "needle_offsets": " ".join(map(str, s.needle_offsets)),
                     "ok": r.ok, "status": r.status, "error": r.error,
                     "correct": correct,
                     "ttft_ms": (r.ttft or 0) * 1000, "tpot_ms": r.tpot * 1000, "e2el_ms": (r.e2el or 0) * 1000,
                     "output_tokens": r.output_tokens, "start_s": r.start,
                     "itls_ms": " ".join(f"{x * 1000:.1f}" for x in r.itls), "output": r.text[:200]})
    slo = parse_slo(args.slo)
    per_model = {m: summarize([r for j, r in zip(jobs, results) if j.model == m], duration, slo) for m in models}
    cells = accuracy(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    report = {"date": stamp, "backend": "openai-chat", "base_url": args.base_url, "models": card,
              "num_prompts": len(jobs), "request_rate": args.request_rate, "burstiness": args.burstiness,
              "max_concurrency": args.max_concurrency, "slo": args.slo, "args": vars(args),
              **summarize(results, duration, slo), "per_model": per_model, "accuracy": cells}
    write_json(out / f"loadtest-{stamp}.json", report)
    write_csv(out / f"loadtest-{stamp}.csv", rows)
    plot_ttft_vs_length(out / "ttft_vs_length.png", rows)
    plot_accuracy_heatmap(out / "accuracy_heatmap.png", cells)
    plot_latency_cdf(out / "latency_cdf.png", rows)
    print(console_table(per_model, cells))
    print(f"results in {out}/ (loadtest-{stamp}.json, .csv, ttft_vs_length.png, accuracy_heatmap.png, "
          "latency_cdf.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
