"""The FastAPI app: OpenAI-style routes over one AsyncEngine.

Every failure that can be known before generating (bad fields, unknown model, context length, overload)
is an HTTP error before any stream byte. A client that disconnects, streaming or not, aborts its request
in the engine: Starlette cancels a stream whose client left, and non-streaming handlers race the work
against the disconnect.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from attention_backends.star import StarUnavailable
from engine.async_engine import AsyncEngine, EngineStepError
from engine.model_loader import EMBEDDED_NAME
from server.admission import Admission
from server.config import ServerConfig
from server.errors import APIError, install_error_handlers
from server.guard import Guard
from server.metrics import EngineCollector, ServerMetrics
from server.openai_format import ChatFormat, CompletionFormat, Format
from server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from server.serving import Job, Serving

VERSION = "0.1.0"


def build_app(engine: AsyncEngine, config: ServerConfig) -> FastAPI:
    llm = engine.engine
    metrics = ServerMetrics(llm.max_model_len)
    admission = Admission(config.max_num_queued_tokens, llm.config.block_size)
    serving = Serving(engine, config, metrics, admission)
    names = [m.name for m in config.served_models]
    metrics.registry.register(EngineCollector(engine, admission, serving.model_of.get, names))

    app = FastAPI(title="longserve", version=VERSION)
    app.state.serving = serving
    install_error_handlers(app)
    root = llm.config.model or EMBEDDED_NAME
    created = int(time.time())

    @app.get("/health")
    async def health() -> Response:
        """503 while draining. A lost Star Attention rank leaves the server up for every other backend: 200,
        with the degraded part named in the body."""
        if admission.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        body: dict[str, Any] = {"status": "ok"}
        if llm.star is not None:
            try:
                llm.star.check()
                body["star"] = {"status": "ok", "world_size": llm.star.world_size}
            except StarUnavailable as e:
                body = {"status": "degraded", "star": {"status": "unavailable", "world_size": llm.star.world_size,
                                                       "reason": str(e)}}
        return JSONResponse(body)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": VERSION}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": m.name, "object": "model", "created": created, "owned_by": "longserve", "root": root,
             "parent": None, "max_model_len": llm.max_model_len, "attention_backend": m.attention_backend,
             "attention_params": m.attention_params.model_dump()} for m in config.served_models]}

    @app.get("/metrics")
    async def metrics_route() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict[str, Any]:
        serving.resolve(req.model)
        if req.messages is not None:
            text, special = serving.chat_text(req.messages, req.add_generation_prompt), False
        else:
            text, special = req.prompt, req.add_special_tokens
        ids = await serving.tokenize(text, special)
        body: dict[str, Any] = {"count": len(ids), "max_model_len": llm.max_model_len, "tokens": ids}
        if req.return_token_strs:
            body["token_strs"] = llm.tokenizer.convert_ids_to_tokens(ids)
        return body

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> dict[str, str]:
        serving.resolve(req.model)
        vocab = llm.loaded.config.vocab_size
        if any(not 0 <= t < vocab for t in req.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", "tokens")
        return {"prompt": llm.tokenizer.decode(req.tokens)}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        arrival = time.monotonic()
        prompts = req.prompt if isinstance(req.prompt, list) and req.prompt else [req.prompt]
        if prompts and isinstance(prompts[0], int):
            prompts = [prompts]
        ids = [await serving.tokenize(p) if isinstance(p, str) else list(p) for p in prompts]
        if req.echo and req.logprobs is not None:
            raise APIError(400, "echo with logprobs needs prompt logprobs, which this server does not compute",
                           "echo")
        await serving.ready_backend(req)
        job = serving.prepare(req, ids, "prompt")
        echo = [llm.tokenizer.decode(p) for p in ids] if req.echo else None
        fmt = CompletionFormat(job, llm.tokenizer, f"cmpl-{uuid.uuid4().hex}", echo)
        return await respond(request, req.stream, req.include_usage, req.continuous_usage, job, fmt, arrival)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request) -> Response:
        arrival = time.monotonic()
        text = serving.chat_text(req.messages, req.add_generation_prompt, req.continue_final_message)
        ids = await serving.tokenize(text, add_special_tokens=False)  # the template has its own special tokens
        await serving.ready_backend(req)
        job = serving.prepare(req, [ids], "messages", await serving.chat_query_tokens(req, ids))
        last = req.messages[-1]
        echo = [last.text()] if req.echo and last.role == "assistant" else None
        fmt = ChatFormat(job, llm.tokenizer, f"chatcmpl-{uuid.uuid4().hex}", echo)
        return await respond(request, req.stream, req.include_usage, req.continuous_usage, job, fmt, arrival)

    async def respond(request: Request, stream: bool, include_usage: bool, continuous: bool, job: Job, fmt: Format,
                      arrival: float) -> Response:
        if stream:
            frames = sse(job, fmt, include_usage, continuous, arrival)
            return StreamingResponse(frames, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            await until_disconnect(request, collect(job, fmt, arrival))
        except EngineStepError as e:
            raise APIError(503 if e.unavailable else 500, str(e)) from e
        except ClientGone:
            return Response(status_code=499)
        return JSONResponse(fmt.response())

    async def collect(job: Job, fmt: Format, arrival: float) -> None:
        async for index, out in serving.run(job, arrival):
            fmt.add(index, out)

    async def sse(job: Job, fmt: Format, include_usage: bool, continuous: bool, arrival: float
                  ) -> AsyncIterator[str]:
        def frame(body: dict[str, Any]) -> str:
            if include_usage:
                body["usage"] = fmt.usage() if continuous else None
            return f"data: {json.dumps(body)}\n\n"

        try:
            if not job.seqs:
                for index, choice in enumerate(fmt.choices):
                    yield frame(fmt.chunk(index, choice.text, [], True))
            async for index, out in serving.run(job, arrival):
                text, logprobs = fmt.add(index, out)
                if text or logprobs or out.finished:
                    yield frame(fmt.chunk(index, text, logprobs, out.finished))
            if include_usage:
                yield f"data: {json.dumps({**fmt.envelope(fmt.object_chunk, []), 'usage': fmt.usage()})}\n\n"
        except EngineStepError as e:
            yield APIError(503 if e.unavailable else 500, str(e)).sse()
        yield "data: [DONE]\n\n"

    app.add_middleware(Guard, api_keys=config.api_keys, max_body_bytes=config.body_limit(llm.max_model_len))
    if config.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=config.allowed_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
                           allow_credentials="*" not in config.allowed_origins)
    return app


class ClientGone(Exception):
    pass


async def until_disconnect(request: Request, work: Awaitable[None]) -> None:
    """Runs `work` unless the client disconnects first, in which case `work` is cancelled (which aborts its
    engine requests) and ClientGone is raised. Reads `receive` rather than polling `is_disconnected`, which
    misses disconnects behind middleware."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise ClientGone
    task.result()


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
