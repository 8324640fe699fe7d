"""The Triton kernels on a GPU, in one run: bf16 parity with the reference ops, which SDPA backend the reference path
runs (torch.profiler), and timings against the reference path with achieved bandwidth or TFLOPS.

    .venv/bin/python benchmarks/check_gpu_kernels.py            # on a CUDA machine, a few minutes
    .venv/bin/python benchmarks/check_gpu_kernels.py --smoke    # every path at toy sizes on the CPU interpreter

Geometry: 32 query / 8 KV heads, head_dim 128 (Llama-3-8B's), bf16, block size 16, one layer's cache, block
tables shuffled. Targets (issue 15): K1 decode >= 70% of HBM bandwidth at B*L >= 256k and >= 4x the reference at
B <= 8, L >= 32k; K2 chunked prefill >= 3x; K3 block-sparse prefill >= 3x at 32k; K4 slot decode >= 3x at 32k.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

if "--smoke" in sys.argv:  # read when the kernels are defined, so before they are imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from common import ROOT  # noqa: E402, F401  (puts the repository on sys.path)

from attention_backends.kernels import block_sparse  # noqa: E402
from attention_backends.kernels.block_sparse import Selection, compress, sparse_prefill  # noqa: E402
from attention_backends.kernels.decode import decode_plan, paged_decode  # noqa: E402
from attention_backends.kernels.paged import context_slots  # noqa: E402
from attention_backends.kernels.prefill import prefill_batch, prefill_into, prefill_plan  # noqa: E402
from attention_backends.kernels.slots import slot_attention  # noqa: E402

HQ, HKV, D, BS = 32, 8, 128, 16
PEAKS = {"H200": (4.8e12, 989e12), "H100": (3.35e12, 989e12)}  # HBM bytes/s, dense bf16 FLOP/s (SXM)


def mode(name: str) -> None:
    os.environ["LONGSERVE_KERNELS"] = name


class Setup:
    """A one-layer cache holding `batch` sequences of `length` tokens in shuffled blocks."""

    def __init__(self, batch: int, length: int, device: torch.device, dtype: torch.dtype, seed: int = 0) -> None:
        g = torch.Generator(device="cpu").manual_seed(seed)
        per = triton.cdiv(length, BS)
        self.num_blocks = batch * per + 1
        torch.manual_seed(seed)  # the caches are drawn where they live: tens of GB at the largest sizes
        self.k = torch.randn(self.num_blocks, BS, HKV, D, device=device, dtype=dtype)
        self.v = torch.randn(self.num_blocks, BS, HKV, D, device=device, dtype=dtype)
        ids = torch.randperm(self.num_blocks - 1, generator=g) + 1
        self.tables = [ids[i * per : (i + 1) * per] for i in range(batch)]
        self.batch, self.length, self.device, self.dtype, self.g = batch, length, device, dtype, g

    def rand(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.g).to(self.device, self.dtype)

    def kv_bytes(self, tokens: int) -> int:
        return 2 * tokens * HKV * D * self.k.element_size()


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of `fn()`, CUDA-synchronised."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def both(fn, device: torch.device, repeats: int) -> tuple[float, float, float]:
    """(reference seconds, Triton seconds, max abs difference) of `fn(mode)`."""
    mode("torch")
    ref = fn()
    t_ref = timed(fn, repeats, device)
    mode("triton")
    got = fn()
    t_tri = timed(fn, repeats, device)
    return t_ref, t_tri, float((got.float() - ref.float()).abs().max())


def decode_case(s: Setup, repeats: int, window: int | None = None, sinks: int = 0):
    q = s.rand(s.batch, HQ, D)
    lens = [s.length] * s.batch

    def run():
        plan = decode_plan(s.tables, lens, BS, [sinks] * s.batch if window else None,
                           [window] * s.batch if window else None, s.device, s.num_blocks)
        return paged_decode(q, s.k, s.v, plan, D**-0.5)

    return both(run, s.device, repeats)


def prefill_case(s: Setup, chunk: int, repeats: int, window: int | None = None, sinks: int = 0):
    q = s.rand(HQ, chunk, D)
    start = s.length - chunk

    def run():
        plan = prefill_plan(start, chunk, sinks=sinks, window=window, dtype=s.dtype, device=s.device)
        out = torch.empty_like(q)
        prefill_into(out, q, None, None, s.k, s.v, prefill_batch([(0, s.tables[0], plan)], HQ // HKV, s.device,
                                                                 s.num_blocks), D**-0.5)
        return out

    return both(run, s.device, repeats)


def slot_case(s: Setup, keep: int, repeats: int):
    slots = torch.stack([context_slots(t, 0, s.length, BS)[torch.randperm(s.length, generator=s.g)[:keep]]
                         for t in s.tables]).unsqueeze(0).expand(HKV, -1, -1).to(s.device)  # [H_kv, B, keep]
    visible = torch.ones(HKV, s.batch, keep, dtype=torch.bool, device=s.device)
    q = s.rand(HQ, s.batch, D)
    return both(lambda: slot_attention(q, s.k, s.v, slots, visible, D**-0.5), s.device, repeats)


def sparse_case(s: Setup, chunk: int, sel: Selection, repeats: int):
    means = s.k[s.tables[0].to(s.device)].float().mean(1)
    c = compress(means, sel)
    q = s.rand(HQ, chunk, D)
    start = s.length - chunk
    return both(lambda: sparse_prefill(s.k, s.v, q, start, s.tables[0], c, sel, D**-0.5), s.device, repeats)


def sdpa_backend_line(s: Setup) -> str:
    """The SDPA kernels the reference decode runs, by name, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    mode("torch")
    q = s.rand(s.batch, HQ, D)
    plan = decode_plan(s.tables, [s.length] * s.batch, BS, device=s.device, num_blocks=s.num_blocks)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if s.device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        paged_decode(q, s.k, s.v, plan, D**-0.5)
    names = sorted({e.key for e in prof.key_averages() if "attention" in e.key.lower()})
    return ", ".join(names) or "(no attention op recorded)"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="toy sizes on the CPU interpreter: checks the script runs")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    torch.set_grad_enabled(False)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (interpreter)"
    bw, flops = next((p for k, p in PEAKS.items() if k in name), (None, None))
    print(f"device: {name}; torch {torch.__version__}, triton {triton.__version__}")
    small = dict(lengths=(64, 160), batches=(1, 2), chunk=32, keep=32, sel=Selection(BS, 32, 32, 16, 1, 1, 4)) \
        if args.smoke else dict(lengths=(4096, 32768, 131072), batches=(1, 8, 64), chunk=2048, keep=8192,
                                sel=Selection(BS, 64, 32, 16, 1, 8, 24))

    # bf16 parity (fp32 in the interpreter, which multiplies bf16 wrongly), every kernel, with windows and sinks.
    dtype = torch.float32 if args.smoke else torch.bfloat16
    s = Setup(3, small["lengths"][-1], device, dtype)
    checks = {
        "K1 decode": decode_case(s, 1),
        "K1 decode, window + sinks": decode_case(s, 1, window=small["lengths"][0] // 2, sinks=8),
        "K2 prefill after cache": prefill_case(s, small["chunk"], 1),
        "K2 prefill, window + sinks": prefill_case(s, small["chunk"], 1, window=small["lengths"][0] // 2, sinks=8),
        "K4 slot decode": slot_case(s, small["keep"], 1),
        "K3 block-sparse prefill": sparse_case(s, small["chunk"], small["sel"], 1),
    }
    print("\n| kernel | max abs error vs the reference op | within 2e-2 |\n|---|---|---|")
    for kernel, (_, _, err) in checks.items():
        print(f"| {kernel} | {err:.2e} | {'yes' if err <= 2e-2 else '**no**'} |")
    ops = sdpa_backend_line(Setup(2, small["lengths"][0], device, dtype))
    print(f"\nreference decode's attention ops (torch.profiler): {ops}")

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print("\n| K1 decode | B | L | reference | Triton | speed-up | Triton GB/s | of peak |")
    print("|---|---|---|---|---|---|---|---|")
    for length in small["lengths"]:
        for batch in small["batches"]:
            if 4 * 2 * batch * length * HKV * D * 2 > 100 * 2**30:  # cache + the reference path's copy
                continue
            s = Setup(batch, length, device, dtype)
            t_ref, t_tri, _ = decode_case(s, args.repeats)
            rate = s.kv_bytes(batch * length) / t_tri
            peak = f"{rate / bw:.0%}" if bw else ""
            print(f"| | {batch} | {length} | {t_ref * 1e3:.3f} ms | {t_tri * 1e3:.3f} ms | {t_ref / t_tri:.2f}x | "
                  f"{rate / 1e9:.0f} | {peak} |", flush=True)
    print("\n| kernel | L | reference | Triton | speed-up | Triton TFLOPS | of peak |\n|---|---|---|---|---|---|---|")
    for length in small["lengths"][:2]:
        s = Setup(1, length, device, dtype)
        chunk = small["chunk"]
        t_ref, t_tri, _ = prefill_case(s, chunk, args.repeats)
        work = 4 * HQ * D * chunk * (length - chunk / 2)  # QK^T and PV over a causal chunk after its cache
        peak = f"{work / t_tri / flops:.0%}" if flops else ""
        print(f"| K2 chunked prefill ({chunk} after {length - chunk}) | {length} | {t_ref * 1e3:.2f} ms | "
              f"{t_tri * 1e3:.2f} ms | {t_ref / t_tri:.2f}x | {work / t_tri / 1e12:.1f} | {peak} |", flush=True)
        sel = small["sel"]
        if length >= sel.k * sel.block:
            block_sparse.TILE_ELEMS = 1 << 26
            t_ref, t_tri, _ = sparse_case(s, chunk, sel, args.repeats)
            work = 4 * HQ * D * chunk * sel.k * sel.block
            print(f"| K3 block-sparse prefill ({sel.k} blocks of {sel.block}) | {length} | {t_ref * 1e3:.2f} ms | "
                  f"{t_tri * 1e3:.2f} ms | {t_ref / t_tri:.2f}x | {work / t_tri / 1e12:.1f} | |", flush=True)
        s = Setup(8 if device.type == "cuda" else 1, length, device, dtype)
        t_ref, t_tri, _ = slot_case(s, min(small["keep"], length), args.repeats)
        print(f"| K4 slot decode (B {s.batch}, {small['keep']} kept per KV head) | {length} | {t_ref * 1e3:.3f} ms | "
              f"{t_tri * 1e3:.3f} ms | {t_ref / t_tri:.2f}x | | |", flush=True)


if __name__ == "__main__":
    main()
