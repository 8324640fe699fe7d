"""Response bodies and stream chunks of `/v1/completions` and `/v1/chat/completions`.

One `Choice` per sequence gathers what the engine streamed; `CompletionFormat` and `ChatFormat` differ
only in how a piece of text, a choice and its logprobs are spelt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.llm_engine import RequestOutput
from engine.sampler import TokenLogprobs
from server.serving import Job

_MIN_LOGPROB = -9999.0  # JSON has no -inf; vLLM clamps the same way


@dataclass
class Choice:
    prefix: str = ""  # echoed text, sent ahead of the first token
    text: str = ""
    num_tokens: int = 0
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    started: bool = False


class Format:
    object_final = ""
    object_chunk = ""

    def __init__(self, job: Job, tokenizer: Any, request_id: str, echo: list[str] | None) -> None:
        self.job, self.tokenizer, self.id = job, tokenizer, request_id
        prompts = [p for p in range(len(job.prompt_ids)) for _ in range(job.n)]
        self.choices = [Choice(prefix=echo[p] if echo else "") for p in prompts]
        if not job.seqs:  # an echo-only request: the prompts are the whole answer
            for c in self.choices:
                c.text, c.started, c.finish_reason = c.prefix, True, "length"

    # -- shared -----------------------------------------------------------------------------------

    def add(self, index: int, out: RequestOutput) -> tuple[str, list[TokenLogprobs]]:
        """Records an output; returns the text to send for it (with any echo) and its logprobs."""
        c = self.choices[index]
        text = out.new_text
        if not c.started:
            text, c.started = c.prefix + text, True
        c.text += text
        c.num_tokens += len(out.new_token_ids)
        c.logprobs += out.logprobs
        if out.finished:
            c.finish_reason, c.stop_reason = out.finish_reason, out.stop_reason
        return text, out.logprobs

    def usage(self) -> dict[str, int]:
        prompt = self.job.num_prompt_tokens
        completion = sum(c.num_tokens for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def envelope(self, obj: str, choices: list[dict]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.job.created, "model": self.job.served.name,
                "choices": choices}

    def chunk(self, index: int, text: str, logprobs: list[TokenLogprobs], finished: bool) -> dict[str, Any]:
        c = self.choices[index]
        return self.envelope(self.object_chunk, [self.chunk_choice(index, text, logprobs, finished, c)])

    def response(self) -> dict[str, Any]:
        body = self.envelope(self.object_final, [self.final_choice(i, c) for i, c in enumerate(self.choices)])
        body["usage"] = self.usage()
        return body

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    # -- spelt differently by each route ----------------------------------------------------------

    def chunk_choice(self, index: int, text: str, logprobs: list[TokenLogprobs], finished: bool, c: Choice
                     ) -> dict[str, Any]:
        raise NotImplementedError

    def final_choice(self, index: int, c: Choice) -> dict[str, Any]:
        raise NotImplementedError


def _lp(x: float) -> float:
    return max(x, _MIN_LOGPROB)


class CompletionFormat(Format):
    object_final = object_chunk = "text_completion"

    def logprobs(self, entries: list[TokenLogprobs], offset: int) -> dict[str, Any] | None:
        if self.job.sampling.logprobs is None:
            return None
        tokens = [self.token_text(e.token_id) for e in entries]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        top = [{self.token_text(t): _lp(lp) for t, lp in [(e.token_id, e.logprob), *e.top]} for e in entries]
        return {"tokens": tokens, "token_logprobs": [_lp(e.logprob) for e in entries], "top_logprobs": top,
                "text_offset": offsets}

    def chunk_choice(self, index, text, logprobs, finished, c):
        return {"index": index, "text": text, "logprobs": self.logprobs(logprobs, len(c.text) - len(text)),
                "finish_reason": c.finish_reason if finished else None,
                "stop_reason": c.stop_reason if finished else None}

    def final_choice(self, index, c):
        return {"index": index, "text": c.text, "logprobs": self.logprobs(c.logprobs, len(c.prefix)),
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}


class ChatFormat(Format):
    object_final, object_chunk = "chat.completion", "chat.completion.chunk"

    def logprobs(self, entries: list[TokenLogprobs]) -> dict[str, Any] | None:
        if self.job.sampling.logprobs is None:
            return None

        def entry(token_id: int, lp: float) -> dict[str, Any]:
            text = self.token_text(token_id)
            return {"token": text, "logprob": _lp(lp), "bytes": list(text.encode())}

        return {"content": [{**entry(e.token_id, e.logprob), "top_logprobs": [entry(t, lp) for t, lp in e.top]}
                            for e in entries]}

    def chunk_choice(self, index, text, logprobs, finished, c):
        delta: dict[str, Any] = {"content": text}
        if c.text == text:  # the first piece of this choice carries the role, as OpenAI's stream does
            delta = {"role": "assistant", **delta}
        return {"index": index, "delta": delta, "logprobs": self.logprobs(logprobs),
                "finish_reason": c.finish_reason if finished else None,
                "stop_reason": c.stop_reason if finished else None}

    def final_choice(self, index, c):
        return {"index": index, "message": {"role": "assistant", "content": c.text},
                "logprobs": self.logprobs(c.logprobs), "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason}
