"""A decode step's linear layers on the embedded model's shapes: every product of the 30 layers (stacked q/k/v,
o, stacked gate/up, down) and the `lm_head`, for a batch of 1 to 16 rows (the decoding sequences), through
longserve's C++ kernel (`linear_rows`) and through torch's matmul on the same plain weights, in the same process.
Each repeat runs all the weights in turn, as a step does, so they come from memory (538 MB) rather than the cache.
Prints medians of interleaved repeats, the weight bytes read per second, and the ratio to one row's time: the
weights are read once per step however many rows share them, so a kernel that streams them keeps that ratio near 1.

    .venv/bin/python benchmarks/bench_linear_rows.py [--rows 1,2,4,8,16] [--repeats 15]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F
from bench_decode_kernel import interleaved_medians
from common import ROOT  # noqa: F401  (puts the repository on sys.path)
from transformers import AutoConfig

from attention_backends.kernels import cpu_ext
from engine.model_loader import resolve_model_dir


def model_weights() -> list[torch.Tensor]:
    """Random weights of the embedded model's linear layers, as `engine/cpu_modules.py` stacks them."""
    c = AutoConfig.from_pretrained(resolve_model_dir(None, progress=False))
    h, kv = c.hidden_size, c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    shapes = [(h + 2 * kv, h), (h, h), (2 * c.intermediate_size, h), (h, c.intermediate_size)]
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g) for _ in range(c.num_hidden_layers) for s in shapes] + [
        torch.randn(c.vocab_size, h, generator=g)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,2,4,8,16")
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    kernel = cpu_ext.load().linear_rows
    weights = model_weights()
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    g = torch.Generator().manual_seed(1)
    inputs = {m: {w.shape[1]: torch.randn(m, w.shape[1], generator=g) for w in weights}
              for m in map(int, args.rows.split(","))}

    def step(m: int, product: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            for w in weights:
                product(inputs[m][w.shape[1]], w)
        return run

    fns = {}
    for m in inputs:
        fns[("cpp", m)] = step(m, lambda x, w: kernel(x, w, None))
        fns[("torch", m)] = step(m, F.linear)
    with torch.inference_mode():
        times = interleaved_medians(fns, args.repeats)
    print(f"{len(weights)} weights, {nbytes / 1e6:.0f} MB, {torch.get_num_threads()} threads; "
          f"medians of {args.repeats} interleaved repeats")
    print("| rows | C++ kernel | GB/s | vs 1 row | torch matmul | GB/s | vs 1 row | C++ / torch |")
    print("|---|---|---|---|---|---|---|---|")
    first = min(inputs)
    for m in inputs:
        c, t = times[("cpp", m)], times[("torch", m)]
        print(f"| {m} | {c * 1e3:.1f} ms | {nbytes / c / 1e9:.1f} | {c / times[('cpp', first)]:.2f}x | "
              f"{t * 1e3:.1f} ms | {nbytes / t / 1e9:.1f} | {t / times[('torch', first)]:.2f}x | {c / t:.2f}x |")


if __name__ == "__main__":
    main()
