"""Errors → HTTP, in one place: ``{"error": {"code", "message", "details"}}`` for every failure."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import ClientError, DistillError, Unauthorized

log = logging.getLogger("distill.api")


class InvalidRequest(ClientError):
    """A query parameter, header or form field is wrong (not the job spec: that is InvalidSpec)."""

    code = "invalid_request"
    http_status = 422


class NotReady(DistillError):
    """A dependency of the service (database, broker, storage) cannot be reached."""

    code = "not_ready"
    http_status = 503


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details or {}}}


def error_response(
    status: int, code: str, message: str, details: dict[str, Any] | None = None, **kw: Any
) -> JSONResponse:
    return JSONResponse(error_body(code, message, details), status_code=status, **kw)


async def _distill_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DistillError)
    return distill_error_response(exc, request.method, request.url.path)


def distill_error_response(exc: DistillError, method: str, path: str) -> JSONResponse:
    """The envelope for a core error, with its status and headers."""
    headers = dict(getattr(exc, "headers", None) or {})
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    if exc.http_status >= 500:
        log.error("%s %s failed: %s", method, path, exc.message)
    return error_response(exc.http_status, exc.code, exc.message, exc.details, headers=headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = [
        {"field": _field(e.get("loc", ())), "message": str(e.get("msg", "invalid"))}
        for e in exc.errors()
    ]
    first = problems[0] if problems else {"field": "", "message": "invalid request"}
    where = f"'{first['field']}': " if first["field"] else ""
    message = f"{where}{first['message']}"
    if _body_not_sent_as_json(request, exc):
        # curl -d without -H: the body arrives as a form, and "not a valid dictionary" misleads.
        content_type = request.headers.get("content-type") or "none"
        message = (
            f"send the body as JSON with the header 'Content-Type: application/json' (this "
            f"request's Content-Type: {content_type}); curl -H 'Content-Type: application/json' "
            "-d '{…}'"
        )
    return error_response(
        422, "invalid_request", message, {"field": first["field"], "errors": problems}
    )


def _body_not_sent_as_json(request: Request, exc: RequestValidationError) -> bool:
    content_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    whole_body = any(tuple(e.get("loc", ())) == ("body",) for e in exc.errors())
    return whole_body and content_type != "application/json" and request.method != "GET"


def _field(loc: Any) -> str:
    # ("query", "limit") → "limit"; ("body", "teacher", "model_id") → "teacher.model_id"
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        parts = parts[1:]
    return ".".join(parts)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "internal" if exc.status_code >= 500 else "error")
    message = str(exc.detail)
    if exc.status_code == 404 and message == "Not Found":
        message = f"no route {request.method} {request.url.path}; see /docs for the API"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}; see /docs"
    elif exc.status_code == 400 and message == "There was an error parsing the body":
        # A body that is not UTF-8: the same answer as one that is not JSON.
        return error_response(
            422,
            "invalid_request",
            "the request body could not be parsed; send UTF-8 JSON (nested at most a few hundred "
            "levels deep)",
            {"field": ""},
        )
    return error_response(exc.status_code, code, message, headers=exc.headers)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    return unexpected_error_response(exc, request.method, request.url.path)


def unexpected_error_response(exc: Exception, method: str, path: str) -> JSONResponse:
    """The ``500`` for an error no handler expected; the traceback goes to the log."""
    log.exception("unhandled error on %s %s", method, path, exc_info=exc)
    return error_response(
        500, "internal", "internal error; the service logged it, try again or report it"
    )


def install_error_handlers(app: FastAPI) -> None:
    """Map core errors, validation errors, HTTP errors and the unexpected to the envelope."""
    app.add_exception_handler(DistillError, _distill_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
