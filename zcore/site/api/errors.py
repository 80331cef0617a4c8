"""The REST API's one error shape, `{"error": {"code", "message", "details"}}`, and the HTTP
status of every error class.

Sits under zcore.site.api.app (which installs the handlers) and over zcore.site.errors
(the stable codes).  A request the API cannot validate is a 422 "invalid_request" listing
each problem (location, message), never echoing the input; an error zcore did not raise on
purpose is a 500 "internal_error" with a plain message, logged, never a traceback.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from zcore import errors as zerr
from zcore.site import errors as serr

log = logging.getLogger(__name__)

# class -> HTTP status; the nearest class in the MRO wins, else 500
HTTP_STATUS: dict[type[BaseException], int] = {
    serr.NotFoundError: 404,
    zerr.CheckpointNotFoundError: 404,
    serr.AlreadyExistsError: 409,
    serr.InUseError: 409,
    zerr.StateError: 409,
    zerr.JournalFullError: 409,
    serr.AuthError: 401,
    serr.SiteNotInitializedError: 503,
    zerr.ConfigError: 422,
    zerr.AlignmentError: 422,
    zerr.OutOfRangeError: 422,
    zerr.ScratchLimitError: 507,
    zerr.ProtocolError: 502,
    zerr.HypervisorError: 502,  # QEMU refused or went away: a gateway's failure
    zerr.RemoteIOError: 502,
}

HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "body_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "too_many_requests",
    500: "internal_error",
    503: "unavailable",
}


def http_status(exc: BaseException) -> int:
    for cls in type(exc).__mro__:
        status = HTTP_STATUS.get(cls)
        if status is not None:
            return status
    return 500


def error_response(
    status: int,
    code: str,
    message: str,
    details: Any = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "details": details}}
    return JSONResponse(body, status_code=status, headers=headers)


def unauthorized(message: str = "a valid API token is required") -> JSONResponse:
    return error_response(
        401, "unauthorized", message, headers={"WWW-Authenticate": 'Bearer realm="zcore"'}
    )


def _problems(exc: RequestValidationError) -> list[dict[str, Any]]:
    return [
        {
            "loc": [str(p) for p in e.get("loc", ())],
            "message": e.get("msg", ""),
            "type": e.get("type"),
        }
        for e in exc.errors()[:50]
    ]


async def _zcore_error(_request: Request, exc: Exception) -> JSONResponse:
    status = http_status(exc)
    if status >= 500:
        log.error("request failed: %s", exc, exc_info=exc)
    return error_response(
        status, serr.error_code(exc), str(exc) or type(exc).__name__, serr.error_details(exc)
    )


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = _problems(exc)
    first = problems[0] if problems else {"loc": [], "message": "invalid request"}
    where = ".".join(first["loc"]) or "request"
    return error_response(422, "invalid_request", f"{where}: {first['message']}", problems)


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    cause = exc.__cause__
    if isinstance(cause, RecursionError):
        message = "the JSON body is nested too deeply"
    elif isinstance(cause, UnicodeDecodeError):
        message = "the JSON body is not valid UTF-8"
    headers = dict(exc.headers) if exc.headers else None
    return error_response(exc.status_code, code, message, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(zerr.ZcoreError, _zcore_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
