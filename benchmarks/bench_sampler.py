"""A decode step's random draws (temperature > 0, the OpenAI API's default) over the embedded model's vocabulary,
for 1 to 64 decoding sequences: the sampler's inverse of each row's cumulative distribution at one uniform number
against the exponential race it replaced (argmax of p / E, E ~ Exp(1) from torch's `exponential_`, one number per
vocabulary entry), each row drawing from its own generator, in the same process; and the whole `Sampler` call.
Prints medians of interleaved repeats.

    .venv/bin/python benchmarks/bench_sampler.py [--rows 1,4,16,64] [--repeats 20]
"""

from __future__ import annotations

import argparse

import torch
from bench_decode_kernel import interleaved_medians
from common import ROOT  # noqa: F401  (puts the repository on sys.path)
from transformers import AutoConfig

from attention_backends.base import NoParams
from engine.model_loader import resolve_model_dir
from engine.sampler import Sampler, invert_cdf
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence


def exponential_race(probs: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
    return torch.stack([(p / torch.empty_like(p).exponential_(generator=g)).argmax() for p, g in zip(probs, gens)])


def inverse_cdf(probs: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
    return invert_cdf(probs, torch.cat([torch.rand(1, generator=g) for g in gens]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,4,16,64")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    vocab = AutoConfig.from_pretrained(resolve_model_dir(None, progress=False)).vocab_size
    g = torch.Generator().manual_seed(0)
    fns = {}
    for n in map(int, args.rows.split(",")):
        logits = torch.randn(n, vocab, generator=g) * 4
        probs = logits.softmax(dim=-1)
        gens = [torch.Generator().manual_seed(i) for i in range(n)]
        seqs = [Sequence(f"r{i}", [1], SamplingParams(temperature=1.0, max_tokens=8), "dense", NoParams(), 9,
                         torch.Generator().manual_seed(i)) for i in range(n)]
        sampler = Sampler(set())
        fns[("race", n)] = lambda p=probs, gs=gens: exponential_race(p, gs)
        fns[("cdf", n)] = lambda p=probs, gs=gens: inverse_cdf(p, gs)
        fns[("sampler", n)] = lambda x=logits, s=seqs, call=sampler: call(x, s)
    with torch.inference_mode():
        times = interleaved_medians(fns, args.repeats)
    print(f"vocabulary {vocab}, {torch.get_num_threads()} threads; medians of {args.repeats} interleaved repeats")
    print("| rows | exponential race | inverse CDF | inverse / race | whole `Sampler` call |")
    print("|---|---|---|---|---|")
    for n in map(int, args.rows.split(",")):
        race, cdf = times[("race", n)], times[("cdf", n)]
        print(f"| {n} | {race * 1e3:.2f} ms | {cdf * 1e3:.3f} ms | {cdf / race:.3f}x | "
              f"{times[('sampler', n)] * 1e3:.2f} ms |")


if __name__ == "__main__":
    main()
