"""Answering a generation request: the whole JSON body, or a Server-Sent Events stream.

A client that disconnects aborts its request in the engine: Starlette cancels a stream whose client left, and
`until_disconnect` races a non-streaming request's work against the disconnect.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from engine.llm_engine import EngineStepError
from server.errors import APIError
from server.openai_format import Format
from server.serving import Job, Serving


class ClientGone(Exception):
    pass


async def respond(serving: Serving, request: Request, stream: bool, include_usage: bool, continuous: bool, job: Job,
                  fmt: Format, arrival: float) -> Response:
    if stream:
        frames = sse(serving, job, fmt, include_usage, continuous, arrival)
        return StreamingResponse(frames, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        await until_disconnect(request, collect(serving, job, fmt, arrival))
    except EngineStepError as e:
        raise APIError(503 if e.unavailable else 500, str(e)) from e
    except ClientGone:
        return Response(status_code=499)
    return JSONResponse(fmt.response())


async def collect(serving: Serving, job: Job, fmt: Format, arrival: float) -> None:
    async for index, out in serving.run(job, arrival):
        fmt.add(index, out)


async def sse(serving: Serving, job: Job, fmt: Format, include_usage: bool, continuous: bool, arrival: float
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
        gone = not task.done()
        if gone:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if gone:  # raised here, not in `finally`, where it would replace a CancelledError of our own
        raise ClientGone
    task.result()


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
