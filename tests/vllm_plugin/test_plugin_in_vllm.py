"""The plugin end to end inside vLLM (in process, eager, a tiny random Llama made here). At its dense limit each
backend gives stock vLLM's greedy tokens: LONGSERVE_DENSE, SWAA with a window over every prompt, Loki keeping every
key, InfLLM-V2 under its switch, Star with one context block, TCA with every budget full. In a sparse setting each
gives longserve's own engine's tokens on the same model, prompts, params and artifact (Loki from a cache on huge
pages, InfLLM-V2 through prefix hits and reused blocks, Star through chunked prefill); `release_kv` hands blocks back
while the request runs and changes no token; a bad config fails start-up with its message."""

from __future__ import annotations

import gc
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="the plugin's tests run in the vLLM venv (make test makes it)")

import torch  # noqa: E402
from backend_harness import greedy_with_logprobs, huge_page_advised, tiny_llama  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402
from vllm.distributed import cleanup_dist_env_and_memory  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402
from vllm.plugins import load_general_plugins  # noqa: E402

from attention_backends.calibration import calibrate, fingerprint, load_artifact, save_artifact  # noqa: E402
from attention_backends.kernels.huge_pages import huge_pages_possible  # noqa: E402
from attention_backends.registry import validate_params  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from longserve_vllm.config import LongserveConfigError  # noqa: E402
from longserve_vllm.kv_spec import SinkWindowManager  # noqa: E402

MAX_TOKENS = 12  # what greedy_with_logprobs generates in longserve's engine
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, detokenize=False)
WINDOWED = {"window": 64, "sinks": 4, "prefill_only": False}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, loaded):  # head_dim 64 (a CPU_ATTN head size), GQA 4/2
    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"), loaded, hidden_size=256, intermediate_size=512,
                      max_position_embeddings=1024)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(100, 40000, (n,), generator=g).tolist() for n in (300, 130, 77)]


@contextmanager
def vllm_engine(tiny, backend: str | None = None, longserve: dict | None = None, **engine_args):
    load_general_plugins()  # before LLM(): the offline API checks the backend name before it loads plugins
    llm = LLM(str(tiny.path), skip_tokenizer_init=True, enforce_eager=True, block_size=32, dtype="float32",
              max_model_len=1024, seed=0, attention_config={"backend": backend} if backend else None,
              additional_config={"longserve": longserve} if longserve is not None else {}, **engine_args)
    try:
        yield llm
    finally:
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()


def generate(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], GREEDY, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def vllm_greedy(tiny, prompts, backend: str | None = None, longserve: dict | None = None, **engine_args
                ) -> list[list[int]]:
    with vllm_engine(tiny, backend, longserve, **engine_args) as llm:
        return generate(llm, prompts)


@pytest.fixture(scope="module")
def stock(tiny, prompts):
    return vllm_greedy(tiny, prompts)


def longserve_engine(tiny, block_size: int = 16, **config) -> LLMEngine:
    return LLMEngine(EngineConfig(num_kv_blocks=6400 // block_size, max_model_len=1024, block_size=block_size,
                                  **config), loaded=tiny)


def longserve_greedy(tiny, prompts, backend: str = "sliding_window", page: int = 16, config: dict | None = None,
                     **params) -> list[list[int]]:
    """longserve's engine's tokens; a method whose blocks are vLLM's pages (InfLLM-V2's, TCA's) runs vLLM's 32;
    `config`: more of the engine's config (its chunking)."""
    return [t for t, _ in greedy_with_logprobs(longserve_engine(tiny, page, **(config or {})), prompts,
                                               attention_backend=backend, attention_params=params)]


@pytest.fixture(scope="module")
def loki_artifact(tiny, tmp_path_factory) -> str:
    """The tiny model's Loki artifact, made by longserve's calibration (what `longserve calibrate` runs)."""
    engine = longserve_engine(tiny)
    path = tmp_path_factory.mktemp("loki") / "loki.safetensors"
    calibrate(engine.calibration, engine.backend("loki"), validate_params("loki", {}), max_tokens=1000, output=path,
              progress=False)
    return str(path)


def test_dense_gives_stock_vllms_tokens(tiny, prompts, stock):
    assert vllm_greedy(tiny, prompts, "LONGSERVE_DENSE") == stock


def test_swaa_with_a_window_over_every_prompt_gives_stock_vllms_tokens(tiny, prompts, stock):
    assert vllm_greedy(tiny, prompts, "LONGSERVE_SWAA", {"window": 1024, "sinks": 4, "prefill_only": False}) == stock


@pytest.mark.parametrize("params", [WINDOWED, {"window": 48, "sinks": 8, "full_attention_layers": [1]}],
                         ids=["windowed-decode", "fa-decode-full-layer-1"])
def test_swaa_gives_longserves_own_tokens(tiny, prompts, stock, params):
    got = vllm_greedy(tiny, prompts, "LONGSERVE_SWAA", params)
    assert got == longserve_greedy(tiny, prompts, **params)
    assert got != stock  # the windows are short enough to change the answer


LOKI_SPARSE = {"k_frac": 0.25, "d_frac": 0.25, "sinks": 4, "local_window": 16, "min_keep": 8, "dense_len": 64}


def test_loki_keeping_every_key_gives_stock_vllms_tokens(tiny, prompts, stock, loki_artifact):
    every = {"k_frac": 1.0, "d_frac": 1.0, "sinks": 0, "local_window": 0, "min_keep": 1, "dense_len": 0}
    assert vllm_greedy(tiny, prompts, "LONGSERVE_LOKI", {**every, "calibration": loki_artifact}) == stock


def test_loki_gives_longserves_own_tokens_from_a_cache_on_huge_pages(tiny, prompts, stock, loki_artifact):
    # With the floor at 128 the 77-token prompt decodes exactly between the two scored ones: the op's rows are not a
    # run of the batch (keeping every key, the other test, they are).
    params = {**LOKI_SPARSE, "dense_len": 128, "calibration": loki_artifact}
    order = [0, 2, 1]
    prompts = [prompts[i] for i in order]
    with vllm_engine(tiny, "LONGSERVE_LOKI", params) as llm:
        got = generate(llm, prompts)
        # The buffer vLLM zeroed, its pages given back at the first forward and written again since (huge_pages.py)
        runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
        assert huge_page_advised(runner.kv_caches[0]) == huge_pages_possible()
    assert got == longserve_greedy(tiny, prompts, "loki", **params)
    want_dense = [stock[i] for i in order]
    assert got[1] == want_dense[1] and got != want_dense  # the short one decodes exactly, the others do not


INFLLM_SPARSE = {"dense_len": 128, "block_size": 32, "kernel_size": 64, "kernel_stride": 32, "topk": 3,
                 "init_blocks": 1, "local_blocks": 1}  # rows from position 128 on: 4 blocks, one of them scored in


def test_infllm_v2_under_its_switch_gives_stock_vllms_tokens(tiny, prompts, stock):
    assert vllm_greedy(tiny, prompts, "LONGSERVE_INFLLM_V2", {**INFLLM_SPARSE, "dense_len": 2048}) == stock


def test_infllm_v2_gives_longserves_own_tokens_through_prefix_hits_and_block_reuse(tiny, prompts, stock):
    """Requests one at a time through a pool of 34 blocks: the second `a` hits the prefix cache, `d` evicts (and
    rewrites) `a`'s cached blocks, the last `a` recomputes into reused blocks; every answer is longserve's. Decoding
    fills a block (position 319) and scores it from the next token on."""
    g = torch.Generator().manual_seed(5)
    a, b, c, d = (torch.randint(100, 40000, (312,), generator=g).tolist() for _ in range(4))
    order = [a, a, b, c, d, a, *prompts]
    with vllm_engine(tiny, "LONGSERVE_INFLLM_V2", INFLLM_SPARSE, num_gpu_blocks_override=34) as llm:
        outs = [llm.generate([TokensPrompt(prompt_token_ids=p)], GREEDY, use_tqdm=False)[0] for p in order]
    cached = [o.num_cached_tokens for o in outs]
    assert cached[1] >= 288 and cached[5] < cached[1]  # a hit, and a's blocks reused by d
    got = [list(o.outputs[0].token_ids) for o in outs]
    assert got == longserve_greedy(tiny, order, "infllm_v2", page=32, **INFLLM_SPARSE)
    assert got[-3:] != stock


STAR_SPARSE = {"block_size": 64, "anchor_size": 32, "query_tokens": 32}


def test_star_with_one_context_block_gives_stock_vllms_tokens(tiny, prompts, stock):
    one_block = {**STAR_SPARSE, "block_size": 1024}
    assert vllm_greedy(tiny, prompts, "LONGSERVE_STAR", one_block, enable_prefix_caching=False) == stock


def test_star_gives_longserves_own_tokens_with_chunked_prefill(tiny, prompts, stock):
    # 100-token chunks: a chunk ends inside a context block, and one crosses into the query
    got = vllm_greedy(tiny, prompts, "LONGSERVE_STAR", STAR_SPARSE, enable_prefix_caching=False,
                      max_num_batched_tokens=100, max_num_seqs=3)
    assert got == longserve_greedy(tiny, prompts, "star", **STAR_SPARSE)
    assert got != stock


TCA_SPARSE = {"tolerance": 0.5, "local_blocks": 1, "dense_len": 64}


@pytest.fixture(scope="module")
def tca_artifact(tiny, tmp_path_factory) -> str:
    """The tiny model's TCA artifact on vLLM's 32-token blocks, made by longserve's calibration."""
    engine = longserve_engine(tiny, 32)
    path = tmp_path_factory.mktemp("tca") / "tca.safetensors"
    params = validate_params("tca", TCA_SPARSE)
    calibrate(engine.calibration, engine.backend("tca"), params, max_tokens=1000, output=path, progress=False)
    return str(path)


def test_tca_with_every_budget_full_gives_stock_vllms_tokens(tiny, prompts, stock, tca_artifact, tmp_path):
    # Thresholds above every redundancy: each block keeps all 32 tokens in every head.
    params = validate_params("tca", TCA_SPARSE)
    tensors = load_artifact(Path(tca_artifact), "tca", fingerprint(tiny.path), params, None, 32)
    full = tmp_path / "full.safetensors"
    save_artifact(full, {"thresholds": torch.full_like(tensors["thresholds"], float("inf"))}, "tca",
                  fingerprint(tiny.path), params, "", 0)
    got = vllm_greedy(tiny, prompts, "LONGSERVE_TCA", {**TCA_SPARSE, "calibration": str(full)},
                      enable_prefix_caching=False)
    assert got == stock


def test_tca_gives_longserves_own_tokens(tiny, prompts, stock, tca_artifact):
    params = {**TCA_SPARSE, "calibration": tca_artifact}
    got = vllm_greedy(tiny, prompts, "LONGSERVE_TCA", params, enable_prefix_caching=False)  # chunked alike
    assert got == longserve_greedy(tiny, prompts, "tca", page=32, **params)
    assert got != stock


def test_tca_in_100_token_chunks_gives_longserves_own_tokens(tiny, prompts, tca_artifact):
    """Chunks after the frontier: each sees the kept tokens of the blocks behind it (the prefill kernel's keep mask),
    one request at a time in both hosts so that their chunks start alike."""
    params = {**TCA_SPARSE, "calibration": tca_artifact}
    got = vllm_greedy(tiny, prompts, "LONGSERVE_TCA", params, enable_prefix_caching=False, max_num_batched_tokens=100,
                      max_num_seqs=1)
    assert got == longserve_greedy(tiny, prompts, "tca", page=32, config={"max_num_batched_tokens": 100,
                                                                           "max_num_seqs": 1}, **params)


def test_release_kv_frees_blocks_and_changes_no_token(tiny, prompts):
    want = vllm_greedy(tiny, prompts[:1], "LONGSERVE_SWAA", WINDOWED)
    with vllm_engine(tiny, "LONGSERVE_SWAA", {**WINDOWED, "release_kv": True}) as llm:
        engine = llm.llm_engine
        manager = engine.engine_core.engine_core.scheduler.kv_cache_manager.coordinator.single_type_managers[0]
        assert isinstance(manager, SinkWindowManager)
        engine.add_request("r", TokensPrompt(prompt_token_ids=prompts[0]), GREEDY)
        released, tokens = [], None
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    tokens = list(out.outputs[0].token_ids)
            for blocks in manager.req_to_blocks.values():
                released.append(sum(b.is_null for b in blocks))
    assert tokens == want[0]
    # 300 prompt tokens, 32-token blocks: past the sink block, every block wholly behind the 64-token window.
    assert max(released) >= (300 - 64 + 1) // 32 - 1


@pytest.mark.parametrize(("backend", "longserve", "says"), [
    ("LONGSERVE_SWAA", {"window": 0}, "window: Input should be greater than or equal to 1"),
    ("LONGSERVE_SWAA", {"window": 64, "full_attention_layers": [5]}, "names layers past the model's 2"),
    ("LONGSERVE_SWAA", {"window": 64, "release_kv": True}, "release_kv needs windowed decode"),
    ("LONGSERVE_LOKI", {"calibration": "/nonexistent/loki.safetensors"},
     "no LONGSERVE_LOKI calibration artifact at .*make it with: longserve calibrate --backend loki"),
    ("LONGSERVE_LOKI", {"prefill": "topk"}, "runs prefill exactly"),
    ("LONGSERVE_INFLLM_V2", {"kernel_size": 32, "kernel_stride": 16}, "multiples of the KV cache block size"),
    ("LONGSERVE_STAR", {}, "serve with --no-enable-prefix-caching"),
    ("LONGSERVE_TCA", {"calibration": "/nonexistent/tca.safetensors"}, "serve with --no-enable-prefix-caching"),
])
def test_a_bad_config_fails_start_up_with_its_message(tiny, backend, longserve, says):
    with pytest.raises(LongserveConfigError, match=says), vllm_engine(tiny, backend, longserve):
        pass
