"""The engine end to end with `LONGSERVE_KERNELS=triton` (the Triton kernels under the interpreter on this CPU) on a
tiny random Llama made here (2 layers, head_dim 64, GQA 4/2): greedy tokens equal the PyTorch reference path's
for dense, SWAA, Loki, InfLLM-V2 and TCA in sparse settings, with chunked prefill and decodes in the same steps."""

from __future__ import annotations

import pytest
import torch
from backend_harness import greedy_with_logprobs, tiny_llama

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine

pytest.importorskip("triton")

RECIPES = {
    "dense": ("dense", {}),
    "swaa": ("sliding_window", {"window": 24, "sinks": 4, "prefill_only": False, "full_attention_layers": [1]}),
    # Loki's and TCA's floors off: the tiny prompts are far below them.
    "loki": ("loki", {"k_frac": 0.3, "d_frac": 0.5, "sinks": 2, "local_window": 4, "dense_len": 0, "min_keep": 1}),
    "infllm_v2": ("infllm_v2", {"dense_len": -1, "block_size": 32, "kernel_size": 32, "kernel_stride": 16, "topk": 3,
                                "init_blocks": 1, "local_blocks": 1}),
    # TCA's decode reads the region through the slot kernel.
    "tca": ("tca", {"tolerance": 0.1, "local_blocks": 1, "dense_len": 0}),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, loaded):  # head_dim 64, GQA 4/2
    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"), loaded, hidden_size=256, intermediate_size=256,
                      max_position_embeddings=1024)


pytestmark = pytest.mark.usefixtures("calibration_cache")


@pytest.mark.parametrize("recipe", RECIPES)
def test_triton_kernels_give_the_reference_tokens(tiny, monkeypatch, recipe):
    backend, params = RECIPES[recipe]
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(100, 40000, (n,), generator=g).tolist() for n in (170, 37)]
    runs = []
    for mode in ("torch", "triton"):
        monkeypatch.setenv("LONGSERVE_KERNELS", mode)
        engine = LLMEngine(EngineConfig(num_kv_blocks=80, max_model_len=1024, max_num_batched_tokens=128,
                                        enable_prefix_caching=False), loaded=tiny)
        runs.append(greedy_with_logprobs(engine, prompts, attention_backend=backend, attention_params=params))
    for (want_tokens, want_lp), (got_tokens, got_lp) in zip(*runs, strict=True):
        assert got_tokens == want_tokens
        assert max(abs(a - b) for a, b in zip(want_lp, got_lp)) < 1e-4
