"""From a validated request body to engine sequences and back: the part completions and chat share.

`prepare` does everything that can fail before a byte is sent (model lookup, sampling checks, context
length, backend params, admission); `run` streams the sequences' outputs, keeps the metrics, and gives the
admission ticket back at the first output. Closing the iterator (a client that left) aborts whatever of the
request is still in the engine.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from jinja2 import TemplateError
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from attention_backends.base import BackendUnavailable
from attention_backends.registry import BackendError, get_backend_class, validate_params
from engine.async_engine import AsyncEngine
from engine.llm_engine import ContextLengthError, RequestOutput
from engine.model_loader import EMBEDDED_NAME
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from server.admission import Admission, Ticket
from server.config import ServedModel, ServerConfig
from server.errors import APIError
from server.metrics import ServerMetrics
from server.protocol import ChatCompletionRequest, ChatMessage, OpenAIRequest

_LONG_TEXT = 20_000  # characters: tokenize longer texts off the event loop

Backend = tuple[str, BaseModel]  # a request's attention backend and its validated params


@dataclass
class Job:
    """One API request: its sequences (prompt-major, n per prompt), and what they need on the way out."""

    served: ServedModel
    backend: str
    sampling: SamplingParams
    n: int
    prompt_ids: list[list[int]]
    seqs: list[Sequence]
    ticket: Ticket | None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompt_ids)


class Serving:
    def __init__(self, engine: AsyncEngine, config: ServerConfig, metrics: ServerMetrics, admission: Admission
                 ) -> None:
        self.engine, self.config, self.metrics, self.admission = engine, config, metrics, admission
        self.llm = engine.engine
        self.tokenizer = self.llm.tokenizer
        self.max_model_len = self.llm.max_model_len
        self.root = self.llm.config.model or EMBEDDED_NAME  # the base model, as /v1/models shows it
        self.created = int(time.time())
        self.model_of: dict[str, str] = {}  # engine request id -> served model name, for the metrics
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def resolve(self, name: str | None) -> ServedModel:
        served = self.config.served(name)
        if served is None:
            raise APIError(404, f"The model `{name}` does not exist.", "model", "model_not_found")
        return served

    @staticmethod
    def refuse_unsupported(req: OpenAIRequest) -> None:
        if (found := req.unsupported()) is not None:
            field_name, message = found
            raise APIError(400, message, field_name)

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) > _LONG_TEXT:
            return await run_in_threadpool(self.tokenizer.encode, text, add_special_tokens=add_special_tokens)
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def truncate(self, req: OpenAIRequest, ids: list[int]) -> list[int]:
        """vLLM's `truncate_prompt_tokens`: the prompt's last k tokens, -1 for as many as the model's length."""
        k = req.truncate_prompt_tokens
        if k is None:
            return ids
        if k > self.max_model_len:
            raise APIError(400, f"truncate_prompt_tokens ({k}) must not exceed the model's maximum context length "
                                f"({self.max_model_len})", "truncate_prompt_tokens")
        k = self.max_model_len if k == -1 else k
        return ids[len(ids) - k:] if k < len(ids) else ids

    def chat_text(self, messages: list[ChatMessage], add_generation_prompt: bool,
                  continue_final_message: bool = False) -> str:
        """The tokenizer's chat template, with nothing from the request beyond the messages and the two flags."""
        conversation = [m.for_template() for m in messages]
        try:
            return self.tokenizer.apply_chat_template(conversation, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt,
                                                      continue_final_message=continue_final_message)
        except (TemplateError, ValueError) as e:
            raise APIError(400, f"the chat template failed on these messages: {e}", "messages") from e

    def backend_of(self, req: OpenAIRequest) -> Backend:
        """The request's backend: its served model's recipe, or the one it names, with validated params."""
        served = self.resolve(req.model)
        if req.attention_backend is None and req.attention_params is None:
            return served.attention_backend, served.attention_params
        name = req.attention_backend or served.attention_backend
        try:
            return name, validate_params(name, req.attention_params)
        except BackendError as e:
            raise APIError(400, str(e), "attention_backend" if req.attention_backend else "attention_params") from e

    async def chat_split(self, req: ChatCompletionRequest, ids: list[int], backend: Backend) -> Backend:
        """For a backend that splits chats (`chat_query_param`, Star Attention's query), that param set to the
        tokens from the last user turn on (everything before it is the context). Unchanged when the request names
        the param itself, or the template renders the earlier turns differently inside the whole chat (then the
        param's default applies)."""
        name, params = backend
        param = get_backend_class(name).chat_query_param
        messages = req.messages
        last = max((i for i, m in enumerate(messages) if m.role == "user"), default=None)
        if param is None or param in params.model_fields_set or last is None:
            return backend
        if last == 0:
            return name, params.model_copy(update={param: len(ids)})
        prefix = await self.tokenize(self.chat_text(messages[:last], add_generation_prompt=False), False)
        if ids[: len(prefix)] != prefix:
            return backend
        return name, params.model_copy(update={param: max(1, len(ids) - len(prefix))})

    def prepare(self, req: OpenAIRequest, prompt_ids: list[list[int]], param: str, backend: Backend) -> Job:
        served = self.resolve(req.model)
        if not prompt_ids or any(not p for p in prompt_ids):
            raise APIError(400, "the prompt is empty", param)
        if req.n * len(prompt_ids) > self.config.max_n_sequences:
            raise APIError(400, f"n ({req.n}) times the number of prompts ({len(prompt_ids)}) exceeds this server's "
                                f"limit of {self.config.max_n_sequences} sequences per request", "n")
        if req.max_new_tokens() == 0:  # vLLM's echo-only request: the prompt back, nothing generated
            if not req.echo:
                raise APIError(400, "max_tokens must be at least 1 (0 is allowed only with echo)", "max_tokens")
            return Job(served, served.attention_backend, SamplingParams(max_tokens=1), req.n, prompt_ids, [], None)
        try:
            sampling = req.sampling_params()
        except ValueError as e:
            raise APIError(400, str(e), self._field(req, str(e))) from e
        if (sampling.logprobs or 0) > self.config.max_logprobs:
            raise APIError(400, f"at most {self.config.max_logprobs} logprobs per token", "logprobs")
        name, params = backend
        rid = uuid.uuid4().hex
        seqs = []
        for p, ids in enumerate(prompt_ids):
            for i in range(req.n):
                sp = sampling
                if sampling.seed is not None and req.n > 1:  # as vLLM: the choices differ but stay reproducible
                    sp = replace(sampling, seed=sampling.seed + i)
                try:
                    seqs.append(self.llm.new_sequence(ids, sp, f"{rid}-{p}-{i}", name, params))
                except ContextLengthError as e:
                    raise APIError(400, str(e), param, "context_length_exceeded") from e
                except BackendError as e:
                    raise APIError(400, str(e), "attention_params") from e
                except BackendUnavailable as e:
                    raise APIError(503, str(e)) from e
                except ValueError as e:
                    raise APIError(400, str(e), self._field(req, str(e), param)) from e
        ticket = self.admission.admit([len(ids) for ids in prompt_ids for _ in range(req.n)], self.engine.stats)
        return Job(served, name, sampling, req.n, prompt_ids, seqs, ticket)

    @staticmethod
    def _field(req: OpenAIRequest, message: str, default: str | None = None) -> str | None:
        """The request field an engine error is about: its messages start with the field's name."""
        first = message.split(" ", 1)[0]
        return first if first in type(req).model_fields else default

    async def ready_backend(self, backend: Backend) -> None:
        """Make the request's backend ready off the event loop when that is slow: a calibration artifact made
        on first use takes seconds to minutes, and other requests must not wait on it."""
        if not self.llm.backend_ready(*backend):
            try:
                await run_in_threadpool(self.llm.prepare_backend, *backend)
            except BackendError as e:
                raise APIError(400, str(e), "attention_params") from e

    async def run(self, job: Job, arrival: float) -> AsyncIterator[tuple[int, RequestOutput]]:
        self.in_flight += 1
        self.idle.clear()
        tracks = [self.metrics.track(job.served.name, job.backend, len(s.prompt_token_ids), arrival)
                  for s in job.seqs]
        for seq in job.seqs:
            self.model_of[seq.request_id] = job.served.name
        failed = False
        try:
            async for index, out in self.engine.stream(job.seqs):
                if job.ticket is not None:
                    self.admission.release(job.ticket, prefilled=True)
                tracks[index].on_output(len(out.new_token_ids))
                if out.finished:
                    tracks[index].on_finish(out.finish_reason)
                yield index, out
        except Exception:
            failed = True
            raise
        finally:
            if job.ticket is not None:
                self.admission.release(job.ticket, prefilled=False)
            why = "shutdown" if self.admission.draining else "client_disconnect"
            for track in tracks:  # the ones still open were cut short: a client that left, or a failure
                track.on_finish("error" if failed else "abort", why)
            for seq in job.seqs:
                self.model_of.pop(seq.request_id, None)
            self.in_flight -= 1
            if not self.in_flight:
                self.idle.set()

