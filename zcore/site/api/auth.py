"""The API's gate: bearer-token authentication, the request body limit and the last-resort
error response, as one pure ASGI middleware around the whole application.

Sits outermost in zcore.site.api.app (inside only Starlette's server-error layer, which it
never lets an exception reach).  Without a valid, unrevoked token only `GET
/api/v1/health` and `GET /api/v1/openapi.json` are served; every other request, to an
existing path or not, answers 401 in the API's error shape, so an unauthenticated client
learns nothing about the routes.  Tokens are checked against their SHA-256 in the site
database, in a worker thread.  A body is read whole (bounded by `max_body_bytes`, 413
past it) before the application sees it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi.security import HTTPBearer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from zcore.site.api.backend import SiteContext
from zcore.site.api.errors import error_response, unauthorized

log = logging.getLogger(__name__)

PREFIX = "/api/v1"
PUBLIC = frozenset({("GET", f"{PREFIX}/health"), ("GET", f"{PREFIX}/openapi.json")})

# documents the scheme in OpenAPI; the middleware does the checking
bearer = HTTPBearer(auto_error=False, description="an API token (`zcore site init` prints one)")


def is_public(method: str, path: str) -> bool:
    method = "GET" if method == "HEAD" else method
    return (method, path.rstrip("/") or "/") in PUBLIC


def _bearer_token(scope: Scope) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == b"authorization":
            try:
                text = bytes(value).decode("latin-1")
            except UnicodeDecodeError:
                return None
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return -1
    return None


class _TooLarge(Exception):
    pass


class Gate:
    """ASGI middleware: auth, body limit, no traceback ever."""

    def __init__(self, app: ASGIApp, ctx: SiteContext) -> None:
        self.app = app
        self.ctx = ctx

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self._handle(scope, receive, tracked_send)
        except Exception as exc:
            log.error(
                "unhandled error in %s %s", scope.get("method"), scope.get("path"), exc_info=exc
            )
            if not started:
                response = error_response(500, "internal_error", "internal error")
                await response(scope, receive, send)

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not is_public(scope["method"], scope["path"]):
            token = _bearer_token(scope)
            record = None
            if token is not None:
                record = await asyncio.to_thread(self.ctx.db.verify_token, token)
            if record is None:
                await unauthorized()(scope, receive, send)
                return
            scope.setdefault("state", {})["token"] = record
        limit = self.ctx.max_body_bytes
        length = _content_length(scope)
        if length is not None and (length < 0 or length > limit):
            await self._too_large(scope, receive, send, limit)
            return
        try:
            body = await self._read_body(receive, limit)
        except _TooLarge:
            await self._too_large(scope, receive, send, limit)
            return
        await self.app(scope, _replay(body, receive), send)

    @staticmethod
    async def _read_body(receive: Receive, limit: int) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    @staticmethod
    async def _too_large(scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        response = error_response(
            413,
            "body_too_large",
            f"the request body is larger than {limit} bytes",
            {"limit": limit},
        )
        await response(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return dict(await receive())

    return replay
