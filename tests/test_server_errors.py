"""Bad input gets an OpenAI-shaped error with the right status, before any stream byte; auth; admission."""

from __future__ import annotations

import asyncio
import math

import httpx
import pytest

from engine.async_engine import EngineStats
from kv_cache.block_pool import PoolUsage
from server.admission import Admission

LONG = "word " * 5000  # ~5000 tokens, past the test server's max_model_len of 4096

# (route, body, status, param or None, code or None)
BAD_INPUTS = [
    ("completions", {"max_tokens": 4}, 400, "prompt", None),
    ("completions", {"prompt": ""}, 400, "prompt", None),
    ("completions", {"prompt": []}, 400, "prompt", None),
    ("completions", {"prompt": [[1, 2], []]}, 400, "prompt", None),
    ("completions", {"prompt": [10**9]}, 400, "prompt", None),
    ("completions", {"prompt": "hi", "model": "no-such-model"}, 404, "model", "model_not_found"),
    ("completions", {"prompt": "hi", "max_tokens": 5000}, 400, "prompt", "context_length_exceeded"),
    ("completions", {"prompt": LONG}, 400, "prompt", "context_length_exceeded"),
    ("completions", {"prompt": LONG, "stream": True}, 400, "prompt", "context_length_exceeded"),
    ("completions", {"prompt": "hi", "temperature": 3}, 400, "temperature", None),
    ("completions", {"prompt": "hi", "top_p": 0}, 400, "top_p", None),
    ("completions", {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens", None),
    ("completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", None),
    ("completions", {"prompt": "hi", "min_tokens": 9, "max_tokens": 3}, 400, None, None),
    ("completions", {"prompt": "hi", "n": 100}, 400, "n", None),
    ("completions", {"prompt": "hi", "logprobs": 50}, 400, "logprobs", None),
    ("completions", {"prompt": "hi", "stop": [""]}, 400, None, None),
    ("completions", {"prompt": "hi", "stop": ["a"] * 40}, 400, "stop", None),
    ("completions", {"prompt": "hi", "stream_options": {"include_usage": True}}, 400, None, None),
    ("completions", {"prompt": "hi", "presence_penalty": 9}, 400, "presence_penalty", None),
    ("completions", {"prompt": "hi", "attention_backend": "nope"}, 400, "attention_backend", None),
    ("completions", {"prompt": "hi", "attention_params": {"window": 4}}, 400, "attention_params", None),
    ("completions", {"prompt": "hi", "echo": True, "logprobs": 1}, 400, "echo", None),
    ("completions", {"prompt": "hi", "seed": 2**70}, 400, "seed", None),
    ("completions", {"prompt": "hi", "logit_bias": {"49152": 5}}, 400, "logit_bias", None),
    ("completions", {"prompt": "hi", "logit_bias": {"the": 5}}, 400, None, None),
    ("completions", {"prompt": "hi", "allowed_token_ids": []}, 400, "allowed_token_ids", None),
    ("completions", {"prompt": "hi", "allowed_token_ids": [10**6]}, 400, "allowed_token_ids", None),
    ("completions", {"prompt": "hi", "stop_token_ids": [10**6]}, 400, "stop_token_ids", None),
    ("completions", {"prompt": "hi", "truncate_prompt_tokens": -2}, 400, "truncate_prompt_tokens", None),
    # Fields asking for what this server does not do: refused by name, not ignored.
    ("completions", {"prompt": "hi", "suffix": " the end"}, 400, "suffix", None),
    ("completions", {"prompt": "hi", "prompt_logprobs": 0}, 400, "prompt_logprobs", None),
    ("completions", {"prompt": "hi", "guided_choice": ["a", "b"]}, 400, "guided_choice", None),
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}},
     400, "response_format", None),
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}],
                          "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
     400, "tools", None),
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}, 400,
     "tool_choice", None),
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "allowed_token_ids": [-1]}, 400,
     "allowed_token_ids", None),
    ("chat/completions", {"messages": []}, 400, "messages", None),
    ("chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role", None),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
     400, None, None),
    ("chat/completions", {"messages": [{"role": "assistant",
                                        "tool_calls": [{"type": "code", "function": {"name": "f"}}]},
                                       {"role": "user", "content": "x"}]}, 400, "messages.0.tool_calls.0.type", None),
    ("chat/completions", {"messages": [{"role": "user", "content": LONG}]}, 400, "messages",
     "context_length_exceeded"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, None, None),
    ("tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, 400, None, None),
    ("detokenize", {"tokens": [-5]}, 400, "tokens", None),
]


def _url(server, route: str) -> str:
    return f"{server.url}/{route}" if route in ("tokenize", "detokenize") else f"{server.base_url}/{route}"


@pytest.mark.parametrize(("route", "body", "status", "param", "code"), BAD_INPUTS,
                         ids=[f"{i}-{r}" for i, (r, *_) in enumerate(BAD_INPUTS)])
def test_bad_input(server, route, body, status, param, code):
    r = httpx.post(_url(server, route), json=body, timeout=60)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")  # an error, not a started stream
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    if code == "context_length_exceeded":
        assert "maximum context length is 4096 tokens" in error["message"]


def test_malformed_json_is_400_not_422(server):
    r = httpx.post(f"{server.base_url}/completions", content=b"{not json", headers={"content-type": "application/json"})
    error = r.json()["error"]
    assert r.status_code == 400 and error["type"] == "invalid_request_error" and error["param"] is None
    assert error["message"].startswith("the request body is not valid JSON") and "(character 1)" in error["message"]


def test_unknown_fields_are_ignored(server):
    r = httpx.post(f"{server.base_url}/completions", json={"prompt": "hi", "max_tokens": 1, "frobnicate": 3})
    assert r.status_code == 200
    # Unsupported fields that ask for nothing pass too: what clients send when they leave a feature off.
    chat = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    for off in ({"response_format": {"type": "text"}}, {"tools": [], "tool_choice": "auto"}, {"suffix": None},
                {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "none"},
                {"use_beam_search": False, "prompt_logprobs": None, "bad_words": []}):
        r = httpx.post(f"{server.base_url}/chat/completions", json={**chat, **off}, timeout=60)
        assert r.status_code == 200, (off, r.text)


def test_malformed_content_length_is_400(server):
    import socket

    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 12abc\r\n\r\n")
        head = sock.recv(4096).decode()
    assert head.startswith("HTTP/1.1 400")


def test_unknown_route_and_method(server):
    assert httpx.get(f"{server.base_url}/nothing-here").json()["error"]["code"] == 404
    assert httpx.get(f"{server.base_url}/completions").status_code == 405


def test_body_too_large_is_413(start_server):
    small = start_server(max_request_body_bytes=1000)
    r = httpx.post(f"{small.base_url}/completions", json={"prompt": "x" * 2000})
    assert r.status_code == 413 and r.json()["error"]["code"] == 413

    def chunked():  # no content-length: the limit is enforced as the body arrives
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"x" * 100
        yield b'"}'

    r = httpx.post(f"{small.base_url}/completions", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_api_key(start_server):
    secured = start_server(api_keys=["k-one", "k-two"])
    body = {"prompt": "hi", "max_tokens": 1}
    assert httpx.get(f"{secured.url}/health").status_code == 200  # the one open route
    for path in ("/v1/models", "/metrics", "/version", "/openapi.json", "/no-such-route"):
        r = httpx.get(f"{secured.url}{path}")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", path
    assert httpx.post(f"{secured.base_url}/completions", json=body).json()["error"]["type"] == "authentication_error"
    wrong = httpx.post(f"{secured.base_url}/completions", json=body, headers={"Authorization": "Bearer k-three"})
    assert wrong.status_code == 401
    basic = httpx.post(f"{secured.base_url}/completions", json=body, headers={"Authorization": "Basic k-one"})
    assert basic.status_code == 401
    for key in ("k-one", "k-two"):
        ok = httpx.post(f"{secured.base_url}/completions", json=body, headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code == 200


def test_cors_only_for_listed_origins(start_server):
    cors = start_server(allowed_origins=["https://app.example"])
    pre = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    r = httpx.options(f"{cors.base_url}/completions", headers=pre)
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    r = httpx.options(f"{cors.base_url}/completions", headers={**pre, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def _stats(free: int) -> EngineStats:
    return EngineStats((), (), PoolUsage(1000, 1000 - free, free, 0, 0, 0), 0)


def test_admission_rules():
    adm = Admission(max_queued_tokens=1000, block_size=16)
    big = adm.admit([5000], _stats(free=10))  # an empty queue always admits: one prompt is never refused on size
    with pytest.raises(Exception) as e:
        adm.admit([10], _stats(free=1000))
    assert e.value.status == 429 and e.value.code == "rate_limit_exceeded" and "Retry-After" in e.value.headers
    adm.release(big, prefilled=True)
    first = adm.admit([600], _stats(free=50))
    with pytest.raises(Exception) as e:
        adm.admit([300], _stats(free=50))  # 38 + 19 blocks needed, 50 free
    assert e.value.status == 503 and e.value.code == "server_overloaded"
    second = adm.admit([100], _stats(free=100))
    assert adm.queued_tokens == 700 and adm.queued_blocks == math.ceil(600 / 16) + math.ceil(100 / 16)
    for t in (first, second, second):  # releasing twice is harmless
        adm.release(t, prefilled=False)
    assert adm.queued_tokens == 0 and adm.queued_blocks == 0
    assert adm.rejections == {"queued_tokens": 1, "kv_cache_full": 1}


def test_overload_gets_429_with_retry_after(start_server):
    busy = start_server(max_num_queued_tokens=3000)

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            long_prompt = list(range(1000, 3800))  # 2800 token ids: a prefill of a second or more here
            first = asyncio.create_task(client.post(f"{busy.base_url}/completions", json={
                "prompt": long_prompt, "max_tokens": 1}))
            while busy.serving.admission.queued_tokens == 0:  # until the first is admitted, not yet prefilled
                assert not first.done(), first.result().text
                await asyncio.sleep(0.002)
            second = await client.post(f"{busy.base_url}/completions", json={"prompt": list(range(500, 900)),
                                                                            "max_tokens": 1})
            return (await first), second

    first, second = asyncio.run(run())
    assert first.status_code == 200
    assert second.status_code == 429 and int(second.headers["retry-after"]) >= 1
    assert second.json()["error"]["code"] == "rate_limit_exceeded"
    assert busy.metric("longserve:admission_rejections_total", reason="queued_tokens") == 1
