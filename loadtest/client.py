"""One streaming chat request, timed as `vllm bench serve` times it.

TTFT: send to the first SSE chunk with a non-empty `choices`. ITL: every gap between consecutive such
chunks. E2EL: send to the last such chunk (the trailing usage chunk excluded). Output tokens come from
the final usage chunk; without one, the number of token chunks is used and the result says so. Every
failure (HTTP status, malformed chunk, in-stream error, timeout, dropped connection) is caught and
recorded, never raised.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class RequestResult:
    model: str
    start: float  # perf_counter at send
    ok: bool = False
    status: int | None = None  # HTTP status; None when no response came
    error: str | None = None
    ttft: float | None = None  # seconds
    itls: list[float] = field(default_factory=list)
    e2el: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    usage_reported: bool = False
    text: str = ""

    @property
    def tpot(self) -> float:
        """vLLM's per-request TPOT: (E2EL - TTFT) / (output tokens - 1); 0 with one output token or fewer."""
        if self.output_tokens <= 1 or self.ttft is None or self.e2el is None:
            return 0.0
        return (self.e2el - self.ttft) / (self.output_tokens - 1)


async def chat_stream(client: httpx.AsyncClient, model: str, messages: list[dict], max_tokens: int,
                      extra: dict | None = None, timeout: float = 600.0) -> RequestResult:
    body = {"model": model, "messages": messages, "max_completion_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, **(extra or {})}
    result = RequestResult(model, time.perf_counter())
    last = None
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body, timeout=timeout) as r:
            result.status = r.status_code
            if r.status_code != 200:
                result.error = (await r.aread()).decode(errors="replace")[:500] or r.reason_phrase
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue  # blank separators and SSE comments
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = f"in-stream error: {chunk['error'].get('message', chunk['error'])}"
                    return result
                now = time.perf_counter()
                if chunk.get("choices"):
                    if result.ttft is None:
                        result.ttft = now - result.start
                    else:
                        result.itls.append(now - last)
                    last = now
                    result.output_tokens += 1
                    result.text += chunk["choices"][0].get("delta", {}).get("content") or ""
                if chunk.get("usage"):
                    result.usage_reported = True
                    result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    result.output_tokens = chunk["usage"]["completion_tokens"]
    except (httpx.HTTPError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        result.error = f"{type(e).__name__}: {e}"[:500]
        return result
    if result.ttft is None:
        result.error = "never received a token chunk"
        return result
    result.e2el = last - result.start
    result.ok = True
    return result
