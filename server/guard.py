"""The ASGI layer in front of every route: API-key check, body-size limit, `x-request-id` echo.

Deny by default: the key is checked on the routed path itself (the ASGI scope's `path`, never a URL
rebuilt from headers), for every path but `/health`, including unknown ones. Keys are compared in
constant time, and every key is compared, so timing tells nothing about which was close.
"""

from __future__ import annotations

import hmac
import json

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import APIError

OPEN_PATHS = frozenset({"/health"})


class Guard:
    def __init__(self, app: ASGIApp, api_keys: list[str], max_body_bytes: int) -> None:
        self.app = app
        self.keys = [k.encode() for k in api_keys]
        self.max_body_bytes = max_body_bytes

    def _authorized(self, scope: Scope) -> bool:
        if not self.keys or scope["path"] in OPEN_PATHS:
            return True
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        ok = False
        for key in self.keys:
            ok |= hmac.compare_digest(token.strip(), key)
        return ok and scheme.lower() == b"bearer"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        request_id = headers.get(b"x-request-id")
        if not self._authorized(scope):
            error = APIError(401, "invalid or missing API key; send `Authorization: Bearer <key>`",
                             code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            await _send_error(send, error, request_id)
            return
        declared = headers.get(b"content-length", b"0")
        if not declared.isdigit():
            await _send_error(send, APIError(400, "malformed Content-Length header"), request_id)
            return
        if int(declared) > self.max_body_bytes:
            await _send_error(send, APIError(413, self._too_large), request_id)
            return

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:  # a chunked body that outgrows its limit
                    raise HTTPException(413, self._too_large)
            return message

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                if request_id is not None:
                    message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id)]
            await send(message)

        await self.app(scope, limited_receive, send_with_id)

    @property
    def _too_large(self) -> str:
        return f"request body is larger than the limit of {self.max_body_bytes} bytes"


async def _send_error(send: Send, error: APIError, request_id: bytes | None) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (error.headers or {}).items()]
    if request_id is not None:
        headers.append((b"x-request-id", request_id))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
