"""The OpenAI-style routes, at module level over the app's `Serving` (`request.app.state.serving`).

Every failure that can be known before generating (bad fields, unknown model, context length, backend params,
overload) is an HTTP error before any stream byte; `Serving.prepare` raises those.
"""

from __future__ import annotations

import time
import uuid
from importlib.metadata import version
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.errors import APIError
from server.openai_format import ChatFormat, CompletionFormat
from server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from server.responses import respond
from server.serving import Serving

VERSION = version("longserve")

router = APIRouter()


def _serving(request: Request) -> Serving:
    return request.app.state.serving


@router.get("/health")
async def health(request: Request) -> Response:
    """503 while draining. A component that lost something (a backend's ranks) leaves the server up for every
    other backend: 200, with the degraded part named in the body."""
    serving = _serving(request)
    if serving.admission.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    parts = {hook.name: body for hook in serving.llm.hooks if (body := hook.health()) is not None}
    degraded = any(body.get("status") != "ok" for body in parts.values())
    return JSONResponse({"status": "degraded" if degraded else "ok", **parts})


@router.get("/version")
async def version() -> dict[str, str]:
    return {"version": VERSION}


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    serving = _serving(request)
    llm = serving.llm
    return {"object": "list", "data": [
        {"id": m.name, "object": "model", "created": serving.created, "owned_by": "longserve", "root": serving.root,
         "parent": None, "max_model_len": llm.max_model_len, "attention_backend": m.attention_backend,
         "attention_params": m.attention_params.model_dump()} for m in serving.config.served_models]}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(generate_latest(_serving(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.post("/tokenize")
async def tokenize(req: TokenizeRequest, request: Request) -> dict[str, Any]:
    serving = _serving(request)
    serving.resolve(req.model)
    if req.messages is not None:
        text, special = serving.chat_text(req.messages, req.add_generation_prompt), False
    else:
        text, special = req.prompt, req.add_special_tokens
    ids = await serving.tokenize(text, special)
    body: dict[str, Any] = {"count": len(ids), "max_model_len": serving.max_model_len, "tokens": ids}
    if req.return_token_strs:
        body["token_strs"] = serving.tokenizer.convert_ids_to_tokens(ids)
    return body


@router.post("/detokenize")
async def detokenize(req: DetokenizeRequest, request: Request) -> dict[str, str]:
    serving = _serving(request)
    serving.resolve(req.model)
    vocab = serving.llm.loaded.config.vocab_size
    if any(not 0 <= t < vocab for t in req.tokens):
        raise APIError(400, f"token ids must be in [0, {vocab})", "tokens")
    return {"prompt": serving.tokenizer.decode(req.tokens)}


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request) -> Response:
    arrival = time.monotonic()
    serving = _serving(request)
    serving.refuse_unsupported(req)
    prompts = req.prompt if isinstance(req.prompt, list) and req.prompt else [req.prompt]
    if prompts and isinstance(prompts[0], int):
        prompts = [prompts]
    ids = [serving.truncate(req, await serving.tokenize(p) if isinstance(p, str) else list(p)) for p in prompts]
    if req.echo and req.logprobs is not None:
        raise APIError(400, "echo with logprobs needs prompt logprobs, which this server does not compute", "echo")
    backend = serving.backend_of(req)
    await serving.ready_backend(backend)
    job = serving.prepare(req, ids, "prompt", backend)
    echo = [serving.tokenizer.decode(p) for p in ids] if req.echo else None
    fmt = CompletionFormat(job, serving.tokenizer, f"cmpl-{uuid.uuid4().hex}", echo)
    return await respond(serving, request, req.stream, req.include_usage, req.continuous_usage, job, fmt, arrival)


@router.post("/v1/chat/completions")
async def chat(req: ChatCompletionRequest, request: Request) -> Response:
    arrival = time.monotonic()
    serving = _serving(request)
    serving.refuse_unsupported(req)
    text = serving.chat_text(req.messages, req.add_generation_prompt, req.continue_final_message)
    # No special tokens from the tokenizer: the template has its own.
    ids = serving.truncate(req, await serving.tokenize(text, add_special_tokens=False))
    backend = serving.backend_of(req)
    await serving.ready_backend(backend)
    job = serving.prepare(req, [ids], "messages", await serving.chat_split(req, ids, backend))
    last = req.messages[-1]
    echo = [last.text()] if req.echo and last.role == "assistant" else None
    fmt = ChatFormat(job, serving.tokenizer, f"chatcmpl-{uuid.uuid4().hex}", echo)
    return await respond(serving, request, req.stream, req.include_usage, req.continuous_usage, job, fmt, arrival)
