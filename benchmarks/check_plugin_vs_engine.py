"""One of the plugin benchmark's passkey prompts through longserve's own engine and through vLLM with the plugin,
greedy: whether a backend's answer inside vLLM is the engine's (and dense's, stock vLLM's). Tells a miss of the
method on this model from a fault of the plugin. Both engines run in the plugin's venv, one after the other.

    .venv-vllm/bin/python benchmarks/check_plugin_vs_engine.py [--backend star] [--length 7680] [--depth 0.1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_vllm_plugin import make_llm, passkey_prompts  # noqa: E402
from vllm import SamplingParams as VllmSampling  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402
from vllm.plugins import load_general_plugins  # noqa: E402

from engine.config import EngineConfig  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.model_loader import resolve_model_dir  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from loadtest.tokens import LocalTokenizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="star", help="longserve's name; the plugin's is LONGSERVE_<NAME>")
    ap.add_argument("--params", default="{}", help="JSON params for both hosts")
    ap.add_argument("--length", type=int, default=7680)
    ap.add_argument("--depth", type=float, default=0.1)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    params = json.loads(args.params)
    model = str(resolve_model_dir(None, progress=False))
    tok = LocalTokenizer(model)
    _, prompts = passkey_prompts(tok, [args.length], [args.depth])
    prompt = prompts[(args.length, args.depth)]
    print(f"{len(prompt)} prompt tokens, key at {args.depth:.0%} depth")

    engine = LLMEngine(EngineConfig(max_model_len=8192, kv_cache_memory=2.0, max_num_batched_tokens=2048))
    sp = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    answers = {f"longserve {b}": engine.generate([prompt], sp, attention_backend=b, attention_params=p)[0].token_ids
               for b, p in (("dense", {}), (args.backend, params))}
    del engine

    load_general_plugins()
    for name, backend in (("vLLM stock", None), (f"vLLM LONGSERVE_{args.backend.upper()}",
                                                 f"LONGSERVE_{args.backend.upper()}")):
        llm = make_llm(model, backend, params if backend else None)
        out = llm.generate([TokensPrompt(prompt_token_ids=prompt)],
                           VllmSampling(max_tokens=args.max_tokens, temperature=0, ignore_eos=True))
        answers[name] = list(out[0].outputs[0].token_ids)
        del llm

    for name, ids in answers.items():
        print(f"{name:32} {tok.tok.decode(ids)[:80]!r}")
    dense, method = list(answers.values())[::2], list(answers.values())[1::2]
    print(f"dense == stock vLLM: {dense[0] == dense[1]}; longserve {args.backend} == LONGSERVE_"
          f"{args.backend.upper()}: {method[0] == method[1]}")


if __name__ == "__main__":
    main()
