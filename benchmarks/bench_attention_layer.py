"""One layer's attention time per backend on synthetic tensors, against `dense` in the same process.

    .venv/bin/python benchmarks/bench_attention_layer.py --backend infllm_v2 [--params JSON] [--repeats 3]
        [--geometry embedded,larger] [--prefill 8192,16384,32768] [--decode 8192,32768,131072]

Prefill: one sequence's whole prompt in one step (store K/V, attend), causal. Decode: one query over a
cache already holding the context (filled directly, then one warm-up step so side tables are built; for
TCA, every block's keep decision is made and the context compacted first). The backend's `prepare` is
timed with its `forward`, as the engine runs them. Median of the repeats. Calibrated backends get an
artifact calibrated on synthetic q/k (the speed does not depend on what a model taught them).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
from common import ROOT  # noqa: F401  (puts the repository on sys.path)

from attention_backends.calibration import CalibratedBackend
from attention_backends.context import AttentionSpec, BackendBatch, Phase, SeqStep
from attention_backends.kernels.paged import context_slots, write_kv
from attention_backends.registry import get_backend_class, validate_params
from attention_backends.tca import TCABackend
from attention_backends.tca_calibration import block_attention, redundancy
from kv_cache.paged_kv import KVSpec, PagedKVCache

GEOMETRIES = {"embedded": (9, 3, 64), "larger": (32, 8, 128)}  # query heads, KV heads, head dim
BS = 16


def make(name: str, params: dict, hq: int, hkv: int, d: int, tokens: int):
    spec = AttentionSpec(1, hq, hkv, d, tokens + BS, BS, (None,))
    kv = PagedKVCache(KVSpec(1, hkv, d, BS), num_blocks=math.ceil(tokens / BS) + 2)
    backend, p = get_backend_class(name)(kv, spec), validate_params(name, params)
    if isinstance(backend, CalibratedBackend):
        g = torch.Generator().manual_seed(0)
        k = torch.randn(hkv, 4096, d, generator=g) * torch.rand(1, 4096, 1, generator=g) * 3  # varied key norms
        calibrator = backend.calibrator(p)
        calibrator.observe(0, torch.randn(hq, 4096, d, generator=g), k)
        backend.load_calibration(p, calibrator.result())
    return backend, p, kv


# Shares of blocks keeping 1, 2, 4, 8, 16 tokens: the mean over heads of `longserve calibrate --backend tca` on
# the embedded model (tolerance 0.05, 4 local blocks). Random q/k attend evenly, so a calibration on them
# keeps nearly everything; instead each head's thresholds are set so its blocks split in these shares.
TCA_SHARES = torch.tensor([0.109, 0.074, 0.168, 0.364, 0.285])


def step_of(params, table: torch.Tensor, start: int, n: int, prompt_len: int, state) -> SeqStep:
    phase = Phase.DECODE if n == 1 and start >= prompt_len else Phase.PREFILL
    return SeqStep(request_id="r", phase=phase, query_start=0, query_len=n, num_computed_tokens=start,
                   num_new_tokens=n, prompt_len=prompt_len, block_table=table, params=params, state=state)


def prime(backend, params, table: torch.Tensor, n: int):
    """The per-sequence state a backend would have built over n cached tokens."""
    state = backend.new_state(params)
    if not isinstance(backend, TCABackend):
        return state
    g, spec = torch.Generator().manual_seed(1), backend.spec
    nb, hkv = n // BS, spec.num_kv_heads
    probe = torch.randn(spec.num_heads, nb, spec.head_dim, generator=g)
    scale = spec.head_dim**-0.5
    red = redundancy(block_attention(probe.view(hkv, -1, nb, spec.head_dim), backend.kv.k[0][table[:nb]], scale))
    cum = TCA_SHARES.cumsum(0)[:-1]
    backend.load_calibration(params, {"thresholds": torch.quantile(red, 1 - cum, dim=1).T[None]})
    backend.decide(0, probe, table[:nb], backend.artifact(params), scale)
    backend.blocks_to_release(step_of(params, table, 0, n, n, state))  # compacts the context
    return state


def run_step(backend, params, table: torch.Tensor, start: int, n: int, prompt_len: int, q, k, v, state) -> float:
    batch = BackendBatch([step_of(params, table, start, n, prompt_len, state)],
                         context_slots(table, start, start + n, BS), None)
    t0 = time.perf_counter()
    batch.meta = backend.prepare(batch)
    backend.forward(0, q, k, v, batch, q.shape[-1] ** -0.5)
    return time.perf_counter() - t0


def time_prefill(name: str, params: dict, geometry: tuple[int, int, int], n: int, repeats: int) -> float:
    hq, hkv, d = geometry
    backend, p, _ = make(name, params, hq, hkv, d, n)
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(h, n, d, generator=g) for h in (hq, hkv, hkv))
    table = torch.arange(1, math.ceil(n / BS) + 1)
    return statistics.median(run_step(backend, p, table, 0, n, n, q, k, v, backend.new_state(p))
                             for _ in range(repeats))


def time_decode(name: str, params: dict, geometry: tuple[int, int, int], n: int, repeats: int) -> float:
    hq, hkv, d = geometry
    backend, p, kv = make(name, params, hq, hkv, d, n + 1)
    g = torch.Generator().manual_seed(n)
    table = torch.arange(1, math.ceil((n + 1) / BS) + 1)
    write_kv(kv.k[0], kv.v[0], torch.randn(n, hkv, d, generator=g), torch.randn(n, hkv, d, generator=g),
             context_slots(table, 0, n, BS))
    q, k, v = (torch.randn(h, 1, d, generator=g) for h in (hq, hkv, hkv))
    state = prime(backend, p, table, n)
    if isinstance(backend, TCABackend):
        kept = sum(len(r) for r in state.rows[0]) / backend.spec.num_kv_heads
        print(f"<!-- {name} keeps {kept / n:.3f} of {n} cached tokens per KV head -->", flush=True)
    run_step(backend, p, table, n, 1, n, q, k, v, state)  # warm-up: side tables of the whole context
    return statistics.median(run_step(backend, p, table, n, 1, n, q, k, v, state) for _ in range(repeats))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", required=True)
    ap.add_argument("--params", default="{}", help="attention_params as JSON")
    ap.add_argument("--label", default="", help="name of the recipe in the table")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--geometry", default="embedded,larger")
    ap.add_argument("--prefill", default="8192,16384,32768")
    ap.add_argument("--decode", default="8192,32768,131072")
    args = ap.parse_args()
    params = json.loads(args.params)
    label = args.label or f"{args.backend} {args.params}"
    torch.set_grad_enabled(False)
    print(f"\n| geometry (Hq/Hkv, D) | phase | context | dense | {label} | speed-up |")
    print("|---|---|---|---|---|---|")
    for geo in args.geometry.split(","):
        hq, hkv, d = GEOMETRIES[geo]
        for phase, sizes, fn in (("prefill", args.prefill, time_prefill), ("decode", args.decode, time_decode)):
            for n in (int(x) for x in sizes.split(",") if x):
                base = fn("dense", {}, GEOMETRIES[geo], n, args.repeats)
                got = fn(args.backend, params, GEOMETRIES[geo], n, args.repeats)
                print(f"| {geo} ({hq}/{hkv}, {d}) | {phase} | {n} | {base * 1e3:.1f} ms | {got * 1e3:.1f} ms | "
                      f"{base / got:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
