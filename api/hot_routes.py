"""The two busiest routes, dispatched without FastAPI's per-request machinery.

Clients poll ``GET /v1/jobs/{job_id}`` and pipelines submit with ``POST /v1/jobs``; together
they are most of the API's traffic. For them, FastAPI's routing, dependency solving and
request objects cost more CPU than the work itself, and under load that CPU is what latency is
made of. :class:`HotRoutes` reads what these two routes need straight from the ASGI scope and
calls the same functions as their FastAPI handlers (``api/routes/jobs.py``), which stay
declared for the OpenAPI schema. A request it does not recognize as plain — a caller not in
the tenant cache, a body that is not a JSON object, an Idempotency-Key out of bounds — goes on
to FastAPI, which answers it as always.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import distill_error_response, error_response, unexpected_error_response
from api.routes import jobs
from core.errors import DistillError
from core.job_creation import MAX_IDEMPOTENCY_KEY_LENGTH, MAX_SPEC_BYTES
from core.logging import bind_log_context

JOBS_PATH = "/v1/jobs"
JOB_PREFIX = "/v1/jobs/"


class HotRoutes:
    """ASGI middleware serving plain ``GET /v1/jobs/{job_id}`` and ``POST /v1/jobs`` requests."""

    def __init__(self, app: ASGIApp, api: FastAPI) -> None:
        self.app = app
        self.api = api
        # Metrics label a request by its route's template (MetricsMiddleware reads scope["route"]).
        self.get_route = _route(jobs.get_job)
        self.post_route = _route(jobs.create_job)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            method, path = scope["method"], scope["path"]
            if method == "GET" and path.startswith(JOB_PREFIX):
                job_id = path[len(JOB_PREFIX) :]
                plain = job_id and "/" not in job_id
                if plain and await self._get_job(scope, job_id, receive, send):
                    return
            elif method == "POST" and path == JOBS_PATH:
                replay = await self._post_job(scope, receive, send)
                if replay is None:
                    return
                receive = replay
        await self.app(scope, receive, send)

    async def _get_job(self, scope: Scope, job_id: str, receive: Receive, send: Send) -> bool:
        state = self.api.state
        tenant = state.tenants.cached(_header(scope, b"authorization"))
        if tenant is None:
            return False
        scope["route"] = self.get_route
        bind_log_context(tenant=tenant.id)
        try:
            response = await jobs.job_response(state, job_id, tenant)
        except DistillError as exc:
            response = distill_error_response(exc, "GET", scope["path"])
        except Exception as exc:  # noqa: BLE001 - outside FastAPI's stack: its 500 is ours to send
            response = unexpected_error_response(exc, "GET", scope["path"])
        await response(scope, receive, send)
        return True

    async def _post_job(self, scope: Scope, receive: Receive, send: Send) -> Receive | None:
        """Answer the request, or return a ``receive`` that replays its body to FastAPI."""
        body = await _read_body(receive)
        if body is None:  # the client went away
            return None
        if len(body) > MAX_SPEC_BYTES:
            response = error_response(
                413,
                "payload_too_large",
                f"a job spec is at most {MAX_SPEC_BYTES} bytes and this one is larger; send the "
                "spec alone (data goes in with POST /v1/datasets)",
            )
            await response(scope, receive, send)
            return None
        state = self.api.state
        tenant = state.tenants.cached(_header(scope, b"authorization"))
        key = _header(scope, b"idempotency-key", None)
        spec = _json_object(scope, body)
        if tenant is None or spec is None or (key is not None and not _valid_key(key)):
            return _replaying(body, receive)
        scope["route"] = self.post_route
        bind_log_context(tenant=tenant.id)
        try:
            response = await jobs.submit_job(state, tenant, spec, key)
        except DistillError as exc:
            response = distill_error_response(exc, "POST", scope["path"])
        except Exception as exc:  # noqa: BLE001 - outside FastAPI's stack: its 500 is ours to send
            response = unexpected_error_response(exc, "POST", scope["path"])
        await response(scope, receive, send)
        return None


def _route(endpoint: Any) -> APIRoute:
    return next(r for r in jobs.router.routes if getattr(r, "endpoint", None) is endpoint)


def _header(scope: Scope, name: bytes, default: str | None = "") -> Any:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return default


def _valid_key(key: str) -> bool:
    return 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_LENGTH


def _json_object(scope: Scope, body: bytes) -> dict[str, Any] | None:
    """The body as a JSON object when it is sent as one; None for anything FastAPI must judge."""
    content_type = _header(scope, b"content-type").partition(";")[0].strip().lower()
    if content_type != "application/json":
        return None
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested too deeply
        return None
    return value if isinstance(value, dict) else None


async def _read_body(receive: Receive) -> bytes | None:
    """The whole body, or as much as shows it is over the limit; None on a disconnect."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if not message.get("more_body", False) or size > MAX_SPEC_BYTES:
            return b"".join(chunks)


def _replaying(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives ``body`` first, then whatever the connection says next."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
