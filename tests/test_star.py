"""Star Attention (`star`) on one rank, and the LSE merge its ranks use: the merge against attention over all
keys, each layer against an explicit reference built from the method's masks, a one-block context against
dense, the chat split, serving."""

from __future__ import annotations

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
)
from conftest import natural_text

from attention_backends.context import AttentionSpec
from attention_backends.kernels.merge import attention_with_lse, merge_attention_states
from attention_backends.registry import BackendError, validate_params
from attention_backends.star import StarBackend
from kv_cache.paged_kv import KVSpec, PagedKVCache

BS, HQ, HKV, D, LAYERS = 16, 4, 2, 16, 2


def _full(q, k, v, visible, scale):
    out = masked_attention(q, k, v, visible, scale)
    scores = q @ k.repeat_interleave(HQ // HKV, 0).transpose(1, 2) * scale
    return out, torch.logsumexp(scores.masked_fill(~visible, float("-inf")), -1)


@pytest.mark.parametrize("split", [[40], [10, 30], [0, 25, 0, 15], [1, 1, 38], [0, 40, 0]],
                         ids=["one", "two", "empty-shards", "tiny", "empty-around"])
def test_lse_merge_of_any_split_equals_attention_over_all_keys(split):
    torch.manual_seed(len(split))
    q, k, v = torch.randn(HQ, 7, D), torch.randn(HKV, 40, D), torch.randn(HKV, 40, D)
    visible = torch.rand(7, 40) < 0.7
    visible[:, 0] = True  # every row sees some key overall; single shards may see none
    want_out, want_lse = _full(q, k, v, visible, D**-0.5)
    outs, lses, start = [], [], 0
    for n in split:
        o, lse = attention_with_lse(q, k[:, start : start + n], v[:, start : start + n], visible[:, start : start + n],
                                    D**-0.5)
        outs.append(o)
        lses.append(lse)
        start += n
    out, lse = merge_attention_states(torch.stack(outs), torch.stack(lses))
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)


def test_merge_is_stable_across_large_gaps_and_keeps_empty_rows_empty():
    outs = torch.randn(3, 2, 4)
    lses = torch.tensor([[2000.0, float("-inf")], [-2000.0, float("-inf")], [float("-inf"), float("-inf")]])
    out, lse = merge_attention_states(outs, lses)
    torch.testing.assert_close(out[0], outs[0, 0])  # the dominant shard alone, no overflow to inf or nan
    assert lse[0] == 2000.0
    assert torch.equal(out[1], torch.zeros(4)) and lse[1] == float("-inf")
    o, lse = attention_with_lse(torch.randn(HQ, 3, D), torch.randn(HKV, 0, D), torch.randn(HKV, 0, D), None, 1.0)
    assert not o.any() and (lse == float("-inf")).all()


def star_visible(qpos: torch.Tensor, n: int, context_len: int, block: int, anchor: int) -> torch.Tensor:
    """The method's masks, spelled out per row: a context token in block i >= 1 sees the anchor and its own block
    up to itself; block 0 and every query or generated token see everything up to themselves."""
    kpos = torch.arange(n)
    rows = []
    for p in qpos.tolist():
        causal = kpos <= p
        i = p // block
        if p < context_len and i > 0:
            causal &= (kpos < anchor) | (kpos >= i * block)
        rows.append(causal)
    return torch.stack(rows)


CASES = {  # name: (params, prompt chunks of A, decodes)
    "anchor-is-block": (dict(block_size=32, query_tokens=20), [150], 20),
    "short-anchor-chunked": (dict(block_size=48, anchor_size=16, query_tokens=7), [40, 57, 33, 20], 20),
    "chunk-splits-query": (dict(block_size=32, query_tokens=50), [100, 30, 20], 5),
}


@pytest.mark.parametrize("case", CASES)
def test_single_process_layers_match_explicit_masks(case):
    """Two sequences per step, chunked prefill across block and context/query boundaries, then decodes."""
    p, chunks, decodes = CASES[case]
    torch.manual_seed(0)
    spec = AttentionSpec(LAYERS, HQ, HKV, D, 4096, BS, (None,) * LAYERS)
    backend = StarBackend(PagedKVCache(KVSpec(LAYERS, HKV, D, BS), num_blocks=80), spec)
    params = validate_params("star", p)
    backend.check(params)
    prompt = sum(chunks)
    seqs = {"a": SynthSeq.random(LAYERS, HQ, HKV, D, prompt + decodes, prompt, 1, BS),
            "b": SynthSeq.random(LAYERS, HQ, HKV, D, 130 + len(chunks) + decodes, 130, 40, BS)}
    schedule = [[("a", n), ("b", 130 if i == 0 else 1)] for i, n in enumerate(chunks + [1] * decodes)]

    def check(layer, name, step, got):
        s = seqs[name]
        qpos = torch.arange(step.num_computed_tokens, step.context_len)
        n = int(qpos[-1]) + 1
        visible = star_visible(qpos, n, s.prompt_len - params.query_tokens, params.block_size, params.anchor)
        want = masked_attention(s.q[layer][:, qpos], s.k[layer][:, :n], s.v[layer][:, :n], visible, D**-0.5)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    run_steps(backend, seqs, schedule, params, check)


def test_params_validation():
    for bad in (dict(anchor_size=64, block_size=32), dict(block_size=0), dict(query_tokens=0), dict(nope=1)):
        with pytest.raises(BackendError):
            validate_params("star", bad)
    spec = AttentionSpec(LAYERS, HQ, HKV, D, 4096, BS, (None,) * LAYERS)
    backend = StarBackend(PagedKVCache(KVSpec(LAYERS, HKV, D, BS), num_blocks=8), spec)
    with pytest.raises(ValueError, match="multiples of the KV cache block"):
        backend.check(validate_params("star", dict(block_size=40)))


@pytest.fixture(scope="module")
def prompts(loaded):
    return [loaded.tokenizer.encode(natural_text(n, 21 + n)) for n in (4, 30, 45)]


def test_one_block_context_is_dense(make_engine, prompts):
    """Every context fits in block 0 (the longest prompt's too): phase 1 is plain causal attention."""
    assert max(len(p) for p in prompts) - 16 <= 1024
    engine = make_engine(max_num_batched_tokens=256)
    assert_same_as_dense(greedy_with_logprobs(engine, prompts),
                         greedy_with_logprobs(engine, prompts, attention_backend="star",
                                              attention_params={"block_size": 1024, "query_tokens": 16}))


def test_blockwise_context_differs_from_dense_and_frees_its_blocks(make_engine, prompts):
    engine = make_engine(max_num_batched_tokens=256)
    dense = greedy_with_logprobs(engine, prompts[2:])
    cached = engine.usage().cached
    star = greedy_with_logprobs(engine, prompts[2:], attention_backend="star",
                                attention_params={"block_size": 64, "anchor_size": 16, "query_tokens": 16})
    assert star[0][1] != dense[0][1]  # the context's KV is blockwise: the method is an approximation
    assert engine.usage().used == 0 and engine.usage().cached == cached  # star publishes nothing to the prefix cache


def test_chat_query_is_the_last_user_turn(start_server, loaded):
    """A chat's split: the last user turn on is the query. The same prompt as a completion with that many query
    tokens gives the same answer; a different split gives different logprobs."""
    server = start_server()
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": natural_text(60, 5)}, {"role": "assistant", "content": "Noted."},
                {"role": "user", "content": "Which house number did the keeper of the river visit first?"}]
    tok = loaded.tokenizer
    ids = tok.encode(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)
    prefix = tok.encode(tok.apply_chat_template(messages[:2], tokenize=False), add_special_tokens=False)
    assert ids[: len(prefix)] == prefix and len(prefix) > 4 * 128
    star = {"attention_backend": "star", "attention_params": {"block_size": 128}}
    chat = client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=10, temperature=0,
                                          logprobs=True, extra_body=star)

    def completion(query_tokens: int):
        body = {"attention_backend": "star", "attention_params": {"block_size": 128, "query_tokens": query_tokens}}
        return client.completions.create(model="smollm2-135m", prompt=ids, max_tokens=10, temperature=0, logprobs=0,
                                         extra_body=body).choices[0]

    same, other = completion(len(ids) - len(prefix)), completion(len(ids) - len(prefix) + 200)
    assert chat.choices[0].message.content == same.text
    got = [t.logprob for t in chat.choices[0].logprobs.content]
    assert max(abs(a - b) for a, b in zip(got, same.logprobs.token_logprobs)) < 1e-5
    assert max(abs(a - b) for a, b in zip(got, other.logprobs.token_logprobs)) > 1e-4


def test_served_by_name_and_by_extra_body(start_server):
    server, client, recipes = serve_default_recipes(start_server)
    assert_recipe_served(server, client, recipes, "smollm2-135m:star", natural_text(120, 3) + " The keeper")
    with pytest.raises(openai.BadRequestError, match="anchor_size"):
        client.completions.create(model="smollm2-135m:star", prompt="Hi", max_tokens=2,
                                  extra_body={"attention_params": {"block_size": 32, "anchor_size": 64}})
