"""GPU-node check: the engine on CUDA against stock transformers on the same device, and one request
through the HTTP server. Prints a table; exits 1 on a mismatch.

    python benchmarks/check_cuda.py [--model DIR] [--tokenizer DIR] [--device cuda]

Without --model it builds a tiny random-weight Llama (seeded) around the given tokenizer. `--device cpu`
runs the same checks on the CPU (how the script itself is tested where no GPU is).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import httpx  # noqa: E402
import torch  # noqa: E402
import uvicorn  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from attention_backends.base import NoParams  # noqa: E402
from engine.async_engine import AsyncEngine  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from server.app import build_app  # noqa: E402
from server.config import ServedModel, ServerConfig  # noqa: E402

NEW = 16


def tiny_llama(tokenizer_dir: str, out: str) -> str:
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = AutoConfig.for_model("llama", hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                                  vocab_size=len(tok), tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def hf_greedy(model, prompt: list[int], device: str) -> tuple[list[int], list[float]]:
    tokens, lps = list(prompt), []
    with torch.inference_mode():
        for _ in range(NEW):
            lp = model(torch.tensor([tokens], device=device)).logits[0, -1].float().log_softmax(-1)
            tok = int(lp.argmax())
            tokens.append(tok)
            lps.append(float(lp[tok]))
    return tokens[len(prompt):], lps


def engine_greedy(engine: LLMEngine, prompts: list[list[int]], sp: SamplingParams
                  ) -> list[tuple[list[int], list[float]]]:
    ids = [engine.add_request(p, sp) for p in prompts]
    got: dict[str, tuple[list[int], list[float]]] = {i: ([], []) for i in ids}
    while engine.has_unfinished_requests():
        for out in engine.step():
            got[out.request_id][0].extend(out.new_token_ids)
            got[out.request_id][1].extend(lp.logprob for lp in out.logprobs)
    return [got[i] for i in ids]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokenizer", default=".gpu/tokenizer")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    if args.device.startswith("cuda"):
        assert torch.cuda.is_available(), "no CUDA device"
        print("device:", torch.cuda.get_device_name(), "| torch", torch.__version__)
    path = args.model or tiny_llama(args.tokenizer, tempfile.mkdtemp())
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(100, 40000, (n,), generator=g).tolist() for n in (17, 130, 700, 1500)]
    greedy = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True, logprobs=0)
    failures = []

    # float32: the engine's packed, paged path against HF's own on the same device
    engine = LLMEngine(EngineConfig(model=path, device=args.device, dtype="float32", num_kv_blocks=512,
                                    max_model_len=2048, max_num_batched_tokens=1024))
    kv = engine.kv.k[0]
    print(f"engine: weights on {next(engine.loaded.model.parameters()).device}, KV {kv.dtype} on {kv.device}")
    outs = engine_greedy(engine, prompts, greedy)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").to(args.device)
    print("| prompt tokens | tokens equal | max abs logprob diff (fp32) |")
    print("|---|---|---|")
    for p, (tokens, logprobs) in zip(prompts, outs):
        want, lps = hf_greedy(ref.eval(), p, args.device)
        same = tokens == want
        n = next((i for i, (a, b) in enumerate(zip(tokens, want)) if a != b), NEW)
        diff = max((abs(a - b) for a, b in zip(logprobs, lps[:n])), default=0.0)
        print(f"| {len(p)} | {same} | {diff:.2e} |")
        if diff > 1e-3 or (not same and n < 2):
            failures.append(f"fp32 mismatch at prompt of {len(p)} tokens")
    del engine

    # dtype auto (bfloat16 on GPU): speed, then one request over HTTP
    auto = LLMEngine(EngineConfig(model=path, device=args.device, num_kv_blocks=2048, max_model_len=2048))
    print("auto dtype:", auto.kv.k[0].dtype)
    batch = [torch.randint(100, 40000, (256,), generator=g).tolist() for _ in range(32)]
    sp = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    auto.generate(batch[:2], sp)
    start = time.perf_counter()
    auto.generate(batch, sp)
    took = time.perf_counter() - start
    print(f"throughput: 32 requests x (256 prompt + 128 output) in {took:.2f} s = {32 * 128 / took:.0f} output tok/s")

    aengine = AsyncEngine(auto)
    app = build_app(aengine, ServerConfig(auto.config, [ServedModel("tiny", "dense", NoParams())]))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=8765, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    r = httpx.post("http://127.0.0.1:8765/v1/completions", json={"model": "tiny", "prompt": prompts[1],
                                                                  "max_tokens": NEW, "temperature": 0}, timeout=60)
    print("HTTP:", r.status_code, r.json().get("usage"))
    if r.status_code != 200 or r.json()["usage"]["completion_tokens"] != NEW:
        failures.append(f"HTTP request failed: {r.text}")
    metrics = httpx.get("http://127.0.0.1:8765/metrics").text
    print("metrics:", [line for line in metrics.splitlines() if line.startswith("vllm:generation_tokens_total")])
    server.should_exit = True
    aengine.shutdown()
    print("FAILURES:", failures or "none")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
