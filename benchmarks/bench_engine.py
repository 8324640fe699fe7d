"""Engine benchmarks on the embedded model, each against a baseline measured in the same run.

    .venv/bin/python benchmarks/bench_engine.py [--repeats 3] [--only throughput,prefill,decode,startup]

Targets (issue 2): throughput >= 3x HF generate one request at a time; 4k prefill <= 1.15x one plain HF
forward; decode TPOT at 2k context <= 1.0x HF generate; no RSS growth across repeats.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psutil  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from engine.config import EngineConfig  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.model_loader import load_model  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402

ROWS: list[tuple[str, str, str, str, str]] = []


def row(name: str, ours: float, base: float, unit: str, target: str) -> None:
    ROWS.append((name, f"{ours:.4g} {unit}", f"{base:.4g} {unit}", f"{ours / base:.3f}x", target))


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def tokens(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, 40000, (n,), generator=g).tolist()


def bench_throughput(engine: LLMEngine, hf, repeats: int) -> None:
    prompts = [tokens(256, i) for i in range(16)]
    sp = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    out_tokens = 16 * 128
    proc = psutil.Process()
    ours, rss = [], []
    for _ in range(repeats):
        ours.append(timed(lambda: engine.generate(prompts, sp)))
        rss.append(proc.memory_info().rss / 2**20)
    def hf_one_by_one() -> None:
        with torch.inference_mode():
            for p in prompts:
                hf.generate(torch.tensor([p]), max_new_tokens=128, min_new_tokens=128, do_sample=False)
    base = timed(hf_one_by_one)
    row("throughput, 16 x (256 in, 128 out)", out_tokens / statistics.median(ours), out_tokens / base,
        "tok/s", ">= 3x")
    print(f"RSS after each throughput repeat (MiB): {', '.join(f'{r:.0f}' for r in rss)}")
    ROWS.append(("RSS growth over repeats", f"{rss[-1] - rss[0]:+.0f} MiB", "", "", "no growth"))


def bench_prefill(engine: LLMEngine, hf, repeats: int) -> None:
    prompt = tokens(4000, 99)
    sp = SamplingParams(temperature=0, max_tokens=1)
    ours, base = [], []
    for _ in range(repeats):
        engine.pool.reset_prefix_cache()  # measure a real prefill, not a cache hit
        ours.append(timed(lambda: engine.generate([prompt], sp)))
        with torch.inference_mode():
            base.append(timed(lambda: hf(torch.tensor([prompt]), use_cache=False, logits_to_keep=1)))
    row("prefill 4,000 tokens (engine TTFT vs one HF forward)", statistics.median(ours), statistics.median(base),
        "s", "<= 1.15x")


def bench_decode(engine: LLMEngine, hf, repeats: int) -> None:
    prompt, n = tokens(2000, 7), 64
    ids = torch.tensor([prompt])
    ours, base = [], []
    for _ in range(repeats):
        engine.pool.reset_prefix_cache()
        engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        engine.step()  # prefill and first token
        ours.append(timed(lambda: [engine.step() for _ in range(n - 1)]) / (n - 1))
        with torch.inference_mode():
            first = timed(lambda: hf.generate(ids, max_new_tokens=1, do_sample=False))
            full = timed(lambda: hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False))
        base.append((full - first) / (n - 1))
    row("decode TPOT at 2,000 context, 1 sequence", statistics.median(ours) * 1e3, statistics.median(base) * 1e3,
        "ms", "<= 1.0x")


def bench_startup() -> None:
    code = ("import time; t=time.perf_counter(); from engine.model_loader import load_model; "
            "load_model(None, progress=False); print(time.perf_counter()-t)")
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, LONGSERVE_CACHE=cache)
        runs = [float(subprocess.check_output([sys.executable, "-c", code], env=env,
                                              stderr=subprocess.DEVNULL).split()[-1]) for _ in range(2)]
    ROWS.append(("cold start (GGUF conversion + load)", f"{runs[0]:.1f} s", "", "", "once"))
    ROWS.append(("warm start (cached safetensors)", f"{runs[1]:.1f} s", "", f"{runs[1] / runs[0]:.3f}x of cold", ""))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default="throughput,prefill,decode,startup")
    args = parser.parse_args()
    only = set(args.only.split(","))
    loaded = load_model(None, progress=False)
    hf = AutoModelForCausalLM.from_pretrained(loaded.path, dtype=torch.float32, attn_implementation="sdpa").eval()
    engine = LLMEngine(EngineConfig(max_num_batched_tokens=4096), loaded=loaded)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}")
    if "throughput" in only:
        bench_throughput(engine, hf, args.repeats)
    if "prefill" in only:
        bench_prefill(engine, hf, args.repeats)
    if "decode" in only:
        bench_decode(engine, hf, args.repeats)
    if "startup" in only:
        bench_startup()
    header = ("benchmark", "longserve", "HF baseline", "ratio", "target")
    widths = [max(len(r[i]) for r in [header, *ROWS]) for i in range(5)]
    for r in [header, tuple("-" * w for w in widths), *ROWS]:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    main()
