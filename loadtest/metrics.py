"""Run summaries with `vllm bench serve`'s definitions and JSON key names, plus accuracy.

Failed requests are left out of the latency statistics (as vLLM does) and counted by cause; goodput
counts a request as good when every SLO given holds (TPOT of a one-token answer is 0).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

import numpy as np

from loadtest.client import RequestResult

PERCENTILES = (90, 99)


def parse_slo(spec: str | None) -> dict[str, float]:
    """`ttft:500,tpot:50` (milliseconds) -> {"ttft": 0.5, "tpot": 0.05} in seconds."""
    out: dict[str, float] = {}
    for part in filter(None, (spec or "").split(",")):
        name, _, ms = part.partition(":")
        if name not in ("ttft", "tpot", "e2el") or not ms:
            raise ValueError(f"bad SLO {part!r}: use ttft:MS, tpot:MS or e2el:MS")
        out[name] = float(ms) / 1000
    return out


def _stats(name: str, values: list[float]) -> dict[str, float]:
    ms = np.asarray(values, dtype=float) * 1000 if values else np.zeros(1)
    out = {f"mean_{name}_ms": float(ms.mean()), f"median_{name}_ms": float(np.median(ms)),
           f"std_{name}_ms": float(ms.std())}
    for p in PERCENTILES:
        out[f"p{p}_{name}_ms"] = float(np.percentile(ms, p))
    return out


def error_kind(r: RequestResult) -> str:
    if r.status is not None and r.status != 200:
        return str(r.status)
    return (r.error or "error").split(":")[0]


def summarize(results: list[RequestResult], duration: float, slo: dict[str, float] | None = None) -> dict[str, Any]:
    done = [r for r in results if r.ok]
    slo = slo or {}
    good = [r for r in done if all({"ttft": r.ttft, "tpot": r.tpot, "e2el": r.e2el}[k] <= v for k, v in slo.items())]
    inp, outp = sum(r.prompt_tokens for r in done), sum(r.output_tokens for r in done)
    summary: dict[str, Any] = {
        "duration": duration, "completed": len(done), "failed": len(results) - len(done),
        "errors": dict(Counter(error_kind(r) for r in results if not r.ok)),
        "total_input_tokens": inp, "total_output_tokens": outp,
        "request_throughput": len(done) / duration if duration else 0.0,
        "request_goodput": len(good) / duration if duration and slo else None,
        "goodput_fraction": len(good) / len(results) if results and slo else None,
        "output_throughput": outp / duration if duration else 0.0,
        "total_token_throughput": (inp + outp) / duration if duration else 0.0,
        "usage_missing": sum(1 for r in done if not r.usage_reported),
    }
    summary |= _stats("ttft", [r.ttft for r in done])
    summary |= _stats("tpot", [r.tpot for r in done if r.output_tokens > 1])
    summary |= _stats("itl", [gap for r in done for gap in r.itls])
    summary |= _stats("e2el", [r.e2el for r in done])
    return summary


def accuracy(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (model, task, length, depth): requests, correct, accuracy; failed requests count as wrong."""
    cells: dict[tuple, list[bool]] = defaultdict(list)
    for row in rows:
        cells[(row["model"], row["task"], row["target_tokens"], row["depth_target"])].append(bool(row["correct"]))
    return [{"model": m, "task": t, "target_tokens": n, "depth": d, "requests": len(v), "correct": sum(v),
             "accuracy": sum(v) / len(v)} for (m, t, n, d), v in sorted(cells.items(), key=lambda kv: str(kv[0]))]
