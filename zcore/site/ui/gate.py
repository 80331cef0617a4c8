"""The UI's gate: an ASGI middleware outside the API's own (zcore.site.api.auth.Gate)
that serves the pages and turns a browser session into the API's bearer token.

Sits outermost in zcore.site.api.app.  What it answers itself:

    GET  /                    the single page (static/index.html); public, holds no data
    GET  /ui/static/NAME      the page's files (a fixed list read at start; no path walks)
    POST /ui/login            {"token": API token} -> a session cookie and the CSRF token
    GET  /ui/session          whether logged in; the session's CSRF token and token name
    POST /ui/logout           ends the session (CSRF token required)

A request to /api/v1 without an Authorization header but with the session cookie goes on
to the API with the session's token as its bearer token; one that changes state (any
method but GET, HEAD and OPTIONS) must carry the session's CSRF token in `X-CSRF-Token`,
else it is a 403 "csrf_failed".  The cookie is HttpOnly and SameSite=Strict (and Secure
over HTTPS), named after the site so that two sites on one host keep apart.  A login must
be a JSON request from this origin: a form on another site can send neither.
"""

from __future__ import annotations

import asyncio
import json
import mimetypes
import re
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

from starlette.responses import FileResponse, JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from zcore.site.api.auth import PREFIX
from zcore.site.api.backend import SiteContext
from zcore.site.api.errors import error_response
from zcore.site.ui.sessions import SessionStore

STATIC_DIR = Path(__file__).parent / "static"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOGIN_BODY_LIMIT = 16 * 1024
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
MEDIA_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html",
               ".svg": "image/svg+xml"}


def static_files(root: Path = STATIC_DIR) -> dict[str, Path]:
    """Every file the UI serves, by its name under /ui/static/."""
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def _secured(response: Response, cache: str = "no-store") -> Response:
    response.headers.update(SECURITY_HEADERS)
    response.headers["Cache-Control"] = cache
    return response


class UiGate:
    """ASGI middleware: the UI's pages, login and sessions (see the module docstring)."""

    def __init__(self, app: ASGIApp, ctx: SiteContext,
                 sessions: SessionStore | None = None) -> None:
        self.app = app
        self.ctx = ctx
        self.sessions = sessions if sessions is not None else SessionStore()
        self.files = static_files()
        self._cookie_name: str | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path in ("/", "/index.html") and scope["method"] in ("GET", "HEAD"):
            response = self._file("index.html")
        elif path.startswith("/ui/"):
            response = await self._ui(scope, receive, path.removeprefix("/ui/"))
        elif path == PREFIX or path.startswith(PREFIX + "/"):
            await self._api(scope, receive, send)
            return
        else:
            await self.app(scope, receive, send)
            return
        await response(scope, receive, send)

    # -- the API, reached with a session ---------------------------------------------------

    async def _api(self, scope: Scope, receive: Receive, send: Send) -> None:
        if _header(scope, b"authorization") is not None:
            await self.app(scope, receive, send)
            return
        session = self.sessions.get(await self._sid(scope))
        if session is None:  # the API's gate answers 401
            await self.app(scope, receive, send)
            return
        if scope["method"] not in SAFE_METHODS and not session.csrf_matches(
                _header(scope, CSRF_HEADER.lower().encode())):
            response = _secured(error_response(
                403, "csrf_failed", f"a request that changes state needs the session's "
                f"CSRF token in the {CSRF_HEADER} header (reload the page)"))
            await response(scope, receive, send)
            return
        headers = [(k, v) for k, v in scope.get("headers", ()) if k != b"cookie"]
        headers.append((b"authorization", f"Bearer {session.token}".encode("latin-1")))
        await self.app({**scope, "headers": headers}, receive, send)

    # -- the UI's own routes ---------------------------------------------------------------

    async def _ui(self, scope: Scope, receive: Receive, rest: str) -> Response:
        method = scope["method"]
        if rest.startswith("static/") and method in ("GET", "HEAD"):
            return self._file(rest.removeprefix("static/"))
        if rest == "login" and method == "POST":
            return await self._login(scope, receive)
        if rest == "session" and method == "GET":
            # 200 either way: a page asking whether it is logged in is not an error
            session = self.sessions.get(await self._sid(scope))
            if session is None:
                return _secured(JSONResponse({"logged_in": False}))
            return _secured(JSONResponse({"logged_in": True, "name": session.name,
                                          "csrf_token": session.csrf}))
        if rest == "logout" and method == "POST":
            return await self._logout(scope)
        return _secured(error_response(404, "not_found", "no such page"))

    def _file(self, name: str) -> Response:
        path = self.files.get(name)
        if path is None:
            return _secured(error_response(404, "not_found", "no such file"))
        media = MEDIA_TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0]
        return _secured(FileResponse(path, media_type=media or "application/octet-stream"),
                        cache="no-cache")

    async def _login(self, scope: Scope, receive: Receive) -> Response:
        refused = self._cross_origin(scope)
        if refused is not None:
            return refused
        body = await _read_body(receive, LOGIN_BODY_LIMIT)
        try:
            doc: Any = json.loads(body)
            token = doc["token"]
            if not isinstance(token, str):
                raise TypeError(token)
        except (ValueError, KeyError, TypeError):
            return _secured(error_response(422, "invalid_request",
                                           'the body must be {"token": "..."}'))
        record = await asyncio.to_thread(self.ctx.db.verify_token, token.strip())
        if record is None:
            return _secured(error_response(401, "unauthorized",
                                           "that token is not a valid API token of this site"))
        sid, session = self.sessions.create(token.strip(), record.name)
        response = _secured(JSONResponse({"logged_in": True, "name": session.name,
                                          "csrf_token": session.csrf}, status_code=201))
        response.set_cookie(await self._cookie(), sid, httponly=True, samesite="strict",
                            secure=scope.get("scheme") == "https", path="/")
        return response

    async def _logout(self, scope: Scope) -> Response:
        sid = await self._sid(scope)
        session = self.sessions.get(sid)
        if session is not None and not session.csrf_matches(
                _header(scope, CSRF_HEADER.lower().encode())):
            return _secured(error_response(403, "csrf_failed", "logging out needs the "
                                           f"session's CSRF token in {CSRF_HEADER}"))
        self.sessions.drop(sid)
        response = _secured(Response(status_code=204))
        response.delete_cookie(await self._cookie(), path="/", httponly=True,
                               samesite="strict")
        return response

    @staticmethod
    def _cross_origin(scope: Scope) -> Response | None:
        kind = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
        if kind != "application/json":
            return _secured(error_response(415, "unsupported_media_type",
                                           "log in with a JSON body"))
        origin, host = _header(scope, b"origin"), _header(scope, b"host")
        if origin is not None and origin.partition("://")[2] != host:
            return _secured(error_response(403, "forbidden", "a login from another origin"))
        return None

    # -- the cookie ------------------------------------------------------------------------

    async def _cookie(self) -> str:
        if self._cookie_name is None:
            try:
                site = await asyncio.to_thread(self.ctx.db.get_site)
                suffix = re.sub(r"[^A-Za-z0-9]", "", str(site.id))[:32]
            except Exception:  # a database without a site yet: one name for all
                suffix = ""
            self._cookie_name = f"zcore_session_{suffix}" if suffix else "zcore_session"
        return self._cookie_name

    async def _sid(self, scope: Scope) -> str | None:
        raw = _header(scope, b"cookie")
        if not raw:
            return None
        jar: SimpleCookie = SimpleCookie()
        try:
            jar.load(raw)
        except Exception:  # a malformed Cookie header names no session
            return None
        morsel = jar.get(await self._cookie())
        return None if morsel is None else morsel.value


async def _read_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return b""  # not JSON: refused as such
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)
