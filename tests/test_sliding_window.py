"""SWAA (`sliding_window`): each layer against an explicit masked reference, reduction to dense, KV release,
and the engine paths (chunked prefill, mixed steps, prefix cache, preemption)."""

from __future__ import annotations

import math

import openai
import pytest
import torch
from backend_harness import (
    SynthSeq,
    assert_recipe_served,
    assert_same_as_dense,
    greedy_with_logprobs,
    masked_attention,
    run_steps,
    serve_default_recipes,
    tiny_llama,
)
from conftest import natural_text

from attention_backends.context import AttentionSpec, Phase
from attention_backends.registry import BackendError, validate_params
from attention_backends.sliding_window import SlidingWindowBackend
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from kv_cache.paged_kv import KVSpec, PagedKVCache

BS, HQ, HKV, D, LAYERS = 16, 4, 2, 16, 2


def reference(q, k, v, qpos, window, sinks, windowed, scale):
    """Full score matrix under the SWAA mask: q `[Hq, T, D]` at positions qpos over keys 0..qpos[-1]."""
    n = int(qpos[-1]) + 1
    kpos = torch.arange(n)
    mask = kpos[None] <= qpos[:, None]
    if windowed:
        mask &= (qpos[:, None] - kpos[None] < window) | (kpos[None] < sinks)
    return masked_attention(q, k[:, :n], v[:, :n], mask, scale)


CASES = [  # (window, sinks, prefill_only, full_attention_layers, release_kv)
    (5, 0, False, None, False),
    (20, 3, True, None, False),
    (37, 17, False, None, True),
    (64, 16, False, [1], False),
    (100, 0, True, "odd", False),
    (23, 40, False, None, True),
]


@pytest.mark.parametrize("chunks", [[150], [40, 61, 49]], ids=["one-chunk", "chunked"])
@pytest.mark.parametrize(("window", "sinks", "prefill_only", "fa", "release"), CASES)
def test_layers_match_masked_reference(window, sinks, prefill_only, fa, release, chunks):
    torch.manual_seed(0)
    spec = AttentionSpec(LAYERS, HQ, HKV, D, 4096, BS, (None,) * LAYERS)
    kv = PagedKVCache(KVSpec(LAYERS, HKV, D, BS), num_blocks=64)
    backend = SlidingWindowBackend(kv, spec)
    params = validate_params("sliding_window", dict(window=window, sinks=sinks, prefill_only=prefill_only,
                                                    full_attention_layers=fa, release_kv=release))
    full = params.full_layers(LAYERS)
    # Two sequences share every step: A runs the chunks then decodes; B (shorter) decodes throughout.
    seqs = {"a": SynthSeq.random(LAYERS, HQ, HKV, D, sum(chunks) + 6, sum(chunks), 1, BS),
            "b": SynthSeq.random(LAYERS, HQ, HKV, D, 40 + 6 + len(chunks), 40, 33, BS)}
    schedule = [[("a", n_a), ("b", 40 if i == 0 else 1)] for i, n_a in enumerate(chunks + [1] * 6)]

    def check(layer, name, step, got):
        s = seqs[name]
        windowed = layer not in full and (step.phase is Phase.PREFILL or not prefill_only)
        qpos = torch.arange(step.num_computed_tokens, step.context_len)
        want = reference(s.q[layer][:, step.num_computed_tokens : step.context_len], s.k[layer], s.v[layer], qpos,
                         window, sinks, windowed, D**-0.5)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    def poison(name, step):  # a later read of a released block would turn outputs into NaN
        released = backend.blocks_to_release(step)
        if released:
            assert release
            for layer in range(LAYERS):
                kv.k[layer][seqs[name].table[released]] = float("nan")
                kv.v[layer][seqs[name].table[released]] = float("nan")

    run_steps(backend, seqs, schedule, params, check, poison)


def test_params_validation():
    for bad in (dict(window=0), dict(sinks=-1), dict(full_attention_layers="most"), dict(release_kv=True),
                dict(release_kv=True, prefill_only=False, full_attention_layers="odd"), dict(nope=1)):
        with pytest.raises(BackendError):
            validate_params("sliding_window", bad)
    p = validate_params("sliding_window", dict(full_attention_layers="every:4"))
    assert sorted(p.full_layers(12)) == [1, 5, 9]
    assert sorted(validate_params("sliding_window", dict(full_attention_layers="even")).full_layers(5)) == [0, 2, 4]


@pytest.fixture(scope="module")
def prompts(loaded):
    return [loaded.tokenizer.encode(natural_text(n, 7 + n)) for n in (3, 25, 50)]


@pytest.mark.parametrize("params", [dict(window=4096, sinks=0, prefill_only=False),
                                    dict(window=8, sinks=3, full_attention_layers=list(range(30)))],
                         ids=["window>=length", "all-layers-full"])
def test_reduces_to_dense(make_engine, prompts, params):
    engine = make_engine(max_num_batched_tokens=256)  # chunked prefill on the longer prompts
    assert_same_as_dense(greedy_with_logprobs(engine, prompts), greedy_with_logprobs(
        engine, prompts, attention_backend="sliding_window", attention_params=params))


def test_mixed_steps_and_prefix_cache(make_engine, prompts):
    params = dict(window=40, sinks=5, prefill_only=False)
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    alone = make_engine().generate(prompts, sp, attention_backend="sliding_window", attention_params=params)
    engine = make_engine(max_num_batched_tokens=128)
    mixed = [engine.add_request(p, sp, attention_backend="sliding_window", attention_params=params)
             for p in prompts] + [engine.add_request(p, sp) for p in prompts]  # dense ones in the same steps
    final = {}
    while engine.has_unfinished_requests():
        final.update({o.request_id: o for o in engine.step() if o.finished})
    assert [final[i].token_ids for i in mixed[:3]] == [o.token_ids for o in alone]
    again = engine.generate(prompts, sp, attention_backend="sliding_window", attention_params=params)
    assert [o.token_ids for o in again] == [o.token_ids for o in alone]
    assert all(o.num_cached_tokens > 0 for o in again[1:])  # served from its own prefix-cache namespace
    dense_after = engine.generate(prompts[1:2], sp)[0]
    assert dense_after.token_ids == final[mixed[4]].token_ids  # never fed SWAA blocks


def test_preemption_recomputes_exactly(make_engine, prompts):
    """With windowed decode too, recomputing a preempted sequence rebuilds the same KV (with FA decode it
    could not: its generated tokens were decoded with full attention, and are re-prefilled windowed)."""
    params = dict(window=40, sinks=5, prefill_only=False)
    sp = SamplingParams(temperature=0, max_tokens=120, ignore_eos=True)
    alone = make_engine().generate(prompts[1:], sp, attention_backend="sliding_window", attention_params=params)
    tight = make_engine(num_kv_blocks=100, max_model_len=1500, max_num_batched_tokens=256)
    out = tight.generate(prompts[1:], sp, attention_backend="sliding_window", attention_params=params)
    assert tight.scheduler.num_preemptions > 0
    assert [o.token_ids for o in out] == [o.token_ids for o in alone]


def test_release_kv_bounds_the_blocks_a_sequence_holds(tmp_path, loaded):
    tiny = tiny_llama(tmp_path, loaded, hidden_size=64, intermediate_size=128, max_position_embeddings=8192)
    engine = LLMEngine(EngineConfig(num_kv_blocks=600, max_model_len=8192, max_num_batched_tokens=512), loaded=tiny)
    window, sinks = 200, 20
    bound = math.ceil((sinks + window) / BS) + 2
    prompt = torch.randint(100, 40000, (4000,), generator=torch.Generator().manual_seed(0)).tolist()
    rid = engine.add_request(prompt, SamplingParams(max_tokens=2000, ignore_eos=True, temperature=0),
                             attention_backend="sliding_window",
                             attention_params=dict(window=window, sinks=sinks, prefill_only=False, release_kv=True))
    peak, outputs = 0, 0
    while engine.has_unfinished_requests():
        outputs += len(engine.step())
        if engine.has_unfinished_requests():
            peak = max(peak, engine.kv_manager.num_held_blocks(rid))
    assert outputs == 2000
    assert peak <= bound, (peak, bound)
    assert engine.usage().used == 0


def test_served_by_name_and_by_extra_body(start_server):
    server, client, recipes = serve_default_recipes(start_server)
    assert {"smollm2-135m:swaa", "smollm2-135m:swaa-aggressive"} <= {m.id for m in client.models.list().data}
    assert_recipe_served(server, client, recipes, "smollm2-135m:swaa-bounded", natural_text(60, 3))
    for bad, says in (({"release_kv": True}, "release_kv"), ({"full_attention_layers": [3, 30]}, "past the model")):
        with pytest.raises(openai.BadRequestError, match=says):
            client.completions.create(model="smollm2-135m", prompt="x", max_tokens=1, extra_body={
                "attention_backend": "sliding_window", "attention_params": bad})
