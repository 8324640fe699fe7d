"""Request bodies of the OpenAI-style routes, with vLLM's field names and defaults.

Unknown fields are kept aside and logged, never rejected (load tools send extras), and never reach the
engine; except those of `UNSUPPORTED`, fields of OpenAI's or vLLM's API that ask for what this server does not
do: ignored, they would return output that breaks what the client asked for (JSON to a schema, a tool call), so a
request that sets one gets a 400 naming it. Ranges that pydantic can check are declared here, so the OpenAPI
schema shows them; the sampling checks that depend on each other live in `SamplingParams`.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

MAX_STOP = 16  # stop strings (and stop token ids) per request
Int64 = Field(default=None, ge=-(2**63), le=2**63 - 1)
MAX_BIAS = 100.0  # logit_bias values are clamped to [-100, 100], as OpenAI documents and vLLM does

_STRUCTURED = "structured output"
UNSUPPORTED = {
    "suffix": "text after the completion (suffix)",
    "prompt_logprobs": "prompt logprobs",
    "response_format": _STRUCTURED,
    "structured_outputs": _STRUCTURED,
    "guided_json": _STRUCTURED,
    "guided_regex": _STRUCTURED,
    "guided_choice": _STRUCTURED,
    "guided_grammar": _STRUCTURED,
    "tools": "tool calling",
    "tool_choice": "tool calling",
    "functions": "function calling",
    "function_call": "function calling",
    "bad_words": "bad_words",
    "use_beam_search": "beam search",
    "logits_processors": "custom logits processors",
}


def _asks(name: str, value: Any, extra: dict[str, Any]) -> bool:
    """Whether an `UNSUPPORTED` field's value asks for its feature: null, false and empty values do not, nor do
    plain text for `response_format`, and tools the request tells the model not to call."""
    if value is None or value is False or (isinstance(value, str | list | dict) and not value):
        return False
    if name == "response_format":
        return value != {"type": "text"}
    if name == "tool_choice":  # "auto" asks only with tools, which are refused on their own
        return value not in ("none", "auto")
    if name == "tools":
        return extra.get("tool_choice") != "none"
    return True


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    seed: int | None = Int64
    stop: str | list[str] | None = Field(default=None, max_length=MAX_STOP)
    stop_token_ids: list[int] | None = Field(default=None, max_length=MAX_STOP)
    n: int = Field(default=1, ge=1)
    best_of: int | None = Field(default=None, ge=1)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0, le=2)
    min_tokens: int = Field(default=0, ge=0)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = False
    user: str | None = None
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)  # keep the prompt's last k tokens (-1: all fit)
    attention_backend: str | None = None
    attention_params: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> OpenAIRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported")
        extra = self.model_extra or {}
        if ignored := sorted(n for n, v in extra.items() if n not in UNSUPPORTED or not _asks(n, v, extra)):
            logger.warning("ignored request fields: %s", ", ".join(ignored))
        return self

    def unsupported(self) -> tuple[str, str] | None:
        """The first field that asks for what this server does not do, and a message saying so."""
        extra = self.model_extra or {}
        for name, value in extra.items():
            if name in UNSUPPORTED and _asks(name, value, extra):
                return name, f"this server does not support {UNSUPPORTED[name]} ({name})"
        return None

    def max_new_tokens(self) -> int | None:
        raise NotImplementedError

    def num_logprobs(self) -> int | None:
        raise NotImplementedError

    def sampling_params(self) -> SamplingParams:
        """Raises ValueError on combinations the engine refuses."""
        return SamplingParams(
            n=1,  # the server fans n out into sequences of their own
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            seed=self.seed,
            max_tokens=self.max_new_tokens(),
            min_tokens=self.min_tokens,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logprobs=self.num_logprobs(),
            logit_bias=None if self.logit_bias is None else {
                t: b if math.isnan(b) else min(MAX_BIAS, max(-MAX_BIAS, b)) for t, b in self.logit_bias.items()},
            allowed_token_ids=self.allowed_token_ids,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.continuous_usage_stats


class CompletionRequest(OpenAIRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=0)
    logprobs: int | None = Field(default=None, ge=0)

    def max_new_tokens(self) -> int | None:
        return self.max_tokens

    def num_logprobs(self) -> int | None:
        return self.logprobs


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str
    arguments: str | dict[str, Any] | None = None  # OpenAI sends a JSON string


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls, in a conversation's history
    tool_call_id: str | None = None  # which call a tool message answers

    def text(self) -> str:
        """The content as one string, text parts joined by newlines as vLLM joins them."""
        if isinstance(self.content, list):
            return "\n".join(part.text for part in self.content)
        return self.content or ""

    def for_template(self) -> dict[str, Any]:
        """The message as vLLM hands it to a chat template: its text, its `name`, a tool message's `tool_call_id`,
        and an assistant's `tool_calls` with their arguments as objects (what tool-use templates read; arguments
        that are not a JSON object become an empty one, so that a bad call in the history does not fail every later
        turn)."""
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.name is not None:
            message["name"] = self.name
        if self.role == "tool" and self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.role == "assistant" and self.tool_calls:
            message["tool_calls"] = [{**call.model_dump(exclude_none=True),
                                      "function": {"name": call.function.name,
                                                   "arguments": _arguments(call.function.arguments)}}
                                     for call in self.tool_calls]
        return message


def _arguments(raw: str | dict[str, Any] | None) -> dict[str, Any]:
    if isinstance(raw, str) and raw:
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            logger.warning("a tool call's arguments in the history are not JSON; the template sees {}")
            return {}
    return raw if isinstance(raw, dict) else {}


class ChatCompletionRequest(OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)  # deprecated by OpenAI in favour of the next
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0)
    add_generation_prompt: bool = True
    continue_final_message: bool = False

    @model_validator(mode="after")
    def _check_chat(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs to be true")
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise ValueError("continue_final_message needs the last message to be the assistant's")
        return self

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    tokens: list[int]
