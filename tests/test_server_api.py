"""The HTTP API through the real `openai` client (sync and async) against a real server on loopback."""

from __future__ import annotations

import asyncio
import itertools
import json

import httpx
import openai
import pytest
from server_harness import ALT_MODEL, MODEL

from engine.sampling_params import SamplingParams
from server.protocol import ChatMessage

PROMPT = "The three most useful things to pack for a long hike are"
CHAT = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Name a large mammal."}]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def expected(make_engine):
    """The in-process engine's greedy answers for the same prompts."""
    engine = make_engine()
    tok = engine.tokenizer
    chat_ids = tok.encode(tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True),
                          add_special_tokens=False)
    greedy = SamplingParams(temperature=0, max_tokens=24)
    text, chat = engine.generate([PROMPT, chat_ids], greedy)
    return {"text": text.text, "text_tokens": len(text.token_ids), "chat": chat.text, "chat_prompt": len(chat_ids),
            "prompt_tokens": len(tok.encode(PROMPT))}


def test_completion_matches_engine(client, expected):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0)
    assert r.choices[0].text == expected["text"]
    assert r.usage.prompt_tokens == expected["prompt_tokens"]
    assert r.usage.completion_tokens == expected["text_tokens"]
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.object == "text_completion" and r.model == MODEL


def test_completion_stream_with_usage(client, expected):
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected["text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1] and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == expected["text_tokens"]


def test_stream_without_include_usage_sends_no_usage_chunk(server):
    with httpx.stream("POST", f"{server.base_url}/completions", json={
            "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "stream": True}) as r:
        frames = [line for line in r.iter_lines() if line]
    assert frames[-1] == "data: [DONE]"
    assert all(f.startswith("data: ") for f in frames)
    assert all('"choices": []' not in f and '"usage"' not in f for f in frames)


def test_continuous_usage_stats(server):
    with httpx.stream("POST", f"{server.base_url}/completions", json={
            "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}) as r:
        bodies = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    counts = [b["usage"]["completion_tokens"] for b in bodies]
    assert counts == sorted(counts) and counts[-1] == 5 and bodies[-1]["choices"] == []
    assert all(b["usage"]["prompt_tokens"] == bodies[0]["usage"]["prompt_tokens"] for b in bodies)


def test_chat_matches_engine(client, expected):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=24, temperature=0)
    assert r.choices[0].message.content == expected["chat"]
    assert r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == expected["chat_prompt"]  # the template's tokens count


def test_async_chat_stream(server, expected):
    async def run() -> tuple[str, list]:
        aclient = openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        stream = await aclient.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=24, temperature=0,
                                                       stream=True, stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        await aclient.close()
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks

    text, chunks = asyncio.run(run())
    assert text == expected["chat"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == expected["chat_prompt"]


def test_async_completion_matches_engine(server, expected):
    async def run():
        aclient = openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        r = await aclient.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0)
        await aclient.close()
        return r

    assert asyncio.run(run()).choices[0].text == expected["text"]


def test_32_concurrent_streams(server):
    async def one(aclient: openai.AsyncOpenAI, i: int) -> tuple[int, int, int]:
        n = 4 + i % 9
        stream = await aclient.completions.create(
            model=MODEL, prompt=f"Story number {i}: once upon a time", max_tokens=n, temperature=0.8, seed=i,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        pieces, usage = 0, None
        async for c in stream:
            pieces += bool(c.choices)
            usage = c.usage or usage
        return n, usage.completion_tokens, pieces

    async def run():
        aclient = openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        results = await asyncio.gather(*(one(aclient, i) for i in range(32)))
        await aclient.close()
        return results

    for n, completion_tokens, pieces in asyncio.run(run()):
        assert completion_tokens == n
        assert 1 <= pieces <= n


def test_model_routing_and_backend_override(client, expected):
    assert {m.id for m in client.models.list().data} == {MODEL, ALT_MODEL}
    alt = client.completions.create(model=ALT_MODEL, prompt=PROMPT, max_tokens=24, temperature=0)
    assert alt.model == ALT_MODEL and alt.choices[0].text == expected["text"]
    over = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0,
                                     extra_body={"attention_backend": "dense", "attention_params": {}})
    assert over.choices[0].text == expected["text"]
    default = client.completions.create(model="", prompt=PROMPT, max_tokens=24, temperature=0)
    assert default.model == MODEL


def test_sampling_fields(client):
    r = client.completions.create(model=MODEL, prompt=[PROMPT, "Rivers flow"], max_tokens=6, n=2, temperature=1.0,
                                  seed=7, logprobs=3, stop=["zzzz"], extra_body={"min_tokens": 6, "top_k": 20})
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for c in r.choices:
        assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) == len(c.logprobs.top_logprobs) == 6
        assert all(1 <= len(top) <= 4 for top in c.logprobs.top_logprobs)
        assert c.logprobs.text_offset[0] == 0
    again = client.completions.create(model=MODEL, prompt=[PROMPT, "Rivers flow"], max_tokens=6, n=2,
                                      temperature=1.0, seed=7, logprobs=3, extra_body={"min_tokens": 6, "top_k": 20})
    assert [c.text for c in again.choices] == [c.text for c in r.choices]  # seeded: reproducible
    assert r.usage.completion_tokens == 24

    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, temperature=0, logprobs=True,
                                          top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(e.top_logprobs) == 2 for e in content)
    assert content[0].logprob == pytest.approx(content[0].top_logprobs[0].logprob)  # greedy: the best token

    stop = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=20, temperature=0, stop=[" 7"])
    assert stop.choices[0].finish_reason == "stop" and " 7" not in stop.choices[0].text
    assert stop.choices[0].model_extra["stop_reason"] == " 7"


def test_logit_bias_and_allowed_token_ids(client, server):
    # OpenAI's logit_bias (string keys, through the client's own field) and vLLM's allowed_token_ids (extra body).
    ids = httpx.post(f"{server.url}/tokenize", json={"prompt": " river lake"}).json()["tokens"]
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0,
                                  logit_bias={str(ids[1]): 100})
    assert r.choices[0].text == " lake" * 3
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, temperature=1.0, seed=3,
                                          extra_body={"allowed_token_ids": ids, "ignore_eos": True})
    assert chat.choices[0].message.content in {"".join(p) for p in itertools.product([" river", " lake"], repeat=4)}


def test_truncate_prompt_tokens_keeps_the_prompts_end(client, server):
    ids = httpx.post(f"{server.url}/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, echo=True, temperature=0,
                                  extra_body={"truncate_prompt_tokens": 4})
    tail = httpx.post(f"{server.url}/detokenize", json={"tokens": ids[-4:]}).json()["prompt"]
    assert r.usage.prompt_tokens == 4 and r.choices[0].text.startswith(tail)
    alone = client.completions.create(model=MODEL, prompt=ids[-4:], max_tokens=2, temperature=0)
    assert r.choices[0].text == tail + alone.choices[0].text
    long_chat = [{"role": "user", "content": "word " * 6000}]  # past the test server's 4096 tokens
    chat = client.chat.completions.create(model=MODEL, messages=long_chat, max_tokens=2,
                                          extra_body={"truncate_prompt_tokens": 100})
    assert chat.usage.prompt_tokens == 100
    with pytest.raises(openai.BadRequestError, match="truncate_prompt_tokens"):
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, extra_body={"truncate_prompt_tokens": 5000})


def test_echo(client, expected):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, echo=True)
    assert r.choices[0].text == PROMPT + expected["text"]
    only = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, echo=True)
    assert only.choices[0].text == PROMPT and only.usage.completion_tokens == 0


def test_tokenize_detokenize_version_health(server, expected):
    tok = httpx.post(f"{server.url}/tokenize", json={"model": MODEL, "prompt": PROMPT}).json()
    assert tok["count"] == expected["prompt_tokens"] == len(tok["tokens"]) and tok["max_model_len"] == 4096
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": tok["tokens"]}).json() == {"prompt": PROMPT}
    chat = httpx.post(f"{server.url}/tokenize", json={"messages": CHAT}).json()
    assert chat["count"] == expected["chat_prompt"]
    assert httpx.get(f"{server.url}/version").json()["version"]
    assert httpx.get(f"{server.url}/health").status_code == 200
    models = httpx.get(f"{server.base_url}/models").json()
    assert models["object"] == "list"
    assert {"id", "object", "created", "owned_by", "root", "max_model_len"} <= set(models["data"][0])


def test_request_id_echo_and_no_cors_by_default(server):
    r = httpx.post(f"{server.base_url}/completions", json={"prompt": "Hi", "max_tokens": 1},
                   headers={"x-request-id": "abc-123", "Origin": "https://evil.example"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "abc-123"
    assert "access-control-allow-origin" not in r.headers


def test_metrics_names_and_labels(server, client):
    client.completions.create(model=ALT_MODEL, prompt=PROMPT, max_tokens=3, temperature=0)
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:num_preemptions_total",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
                 "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
                 "vllm:e2e_request_latency_seconds_bucket", "vllm:request_prompt_tokens_bucket",
                 "vllm:request_generation_tokens_bucket"):
        assert f'{name}{{' in text and f'model_name="{MODEL}"' in text, name
    assert server.metric("vllm:generation_tokens_total", model_name=ALT_MODEL) >= 3
    assert server.metric("longserve:requests_total", model_name=ALT_MODEL, attention_backend="dense") >= 1
    assert server.metric("vllm:prefix_cache_queries_total") > 0


def test_a_tool_call_history_reaches_the_chat_template_as_vllm_hands_it():
    calls = [{"role": "user", "content": [{"type": "text", "text": "Weather in"}, {"type": "text", "text": "Paris?"}]},
             {"role": "assistant", "content": None,
              "tool_calls": [{"id": "c1", "type": "function",
                              "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
             {"role": "tool", "tool_call_id": "c1", "name": "weather", "content": "18 C"},
             {"role": "assistant", "tool_calls": [{"id": "c2", "function": {"name": "weather", "arguments": "{bad"}}]}]
    assert [ChatMessage(**m).for_template() for m in calls] == [
        {"role": "user", "content": "Weather in\nParis?"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"id": "c1", "type": "function",
                         "function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "18 C", "name": "weather", "tool_call_id": "c1"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"id": "c2", "type": "function", "function": {"name": "weather", "arguments": {}}}]},
    ]
