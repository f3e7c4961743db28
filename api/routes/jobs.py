"""Jobs: create (validated against the tenant's models and datasets), list, get, cancel, events."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from sqlalchemy import Engine, Row, select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import State

from api.deps import IdempotencyKeyHeader, OwnedJobDep, SessionDep, TenantDep, not_found, page
from api.errors import InvalidRequest
from api.schemas import (
    EventList,
    EventPublic,
    JobList,
    JobPublic,
    JobStatus,
    error_responses,
    json_response,
)
from core.db import read_with_retry
from core.job_creation import JobRequest
from core.jobs import TERMINAL_STATUSES, request_cancel
from core.logging import bind_log_context
from core.models import Job, JobEvent, Tenant

log = logging.getLogger("distill.api")
router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=error_responses(401))

# Event numbers are 32-bit integers in the database; a larger cursor is a client's mistake.
MAX_SEQ = 2**31 - 1
SSE_POLL_SECONDS = 0.5
SSE_KEEPALIVE_SECONDS = 15.0
# The columns of a job that its public form shows (``job_public`` reads them by name).
PUBLIC_COLUMNS = [
    Job.__table__.c[name] for name in JobPublic.model_fields if name in Job.__table__.c
]

SPEC_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/JobSpec"}}},
    }
}


# --- responses -----------------------------------------------------------------------------------


def job_public(job: Job | Row[Any] | SimpleNamespace) -> JobPublic:
    """The API's job object: progress is filled in with the spec's stage and epoch counts."""
    spec = job.spec or {}
    epochs = (spec.get("training") or {}).get("epochs")
    progress: dict[str, Any] = {
        "stages": len(spec.get("stages") or []) or 1,
        "epochs": epochs.get("auto") if isinstance(epochs, dict) else epochs,  # {"auto": n}
        "fraction": 0.0,
    }
    progress.update(job.progress or {})
    if job.status == "succeeded":
        progress["fraction"] = 1.0
    return JobPublic.model_validate(
        {
            **{c: getattr(job, c) for c in JobPublic.model_fields if c != "progress"},
            "progress": progress,
        }
    )


# --- routes ------------------------------------------------------------------------------------


@router.post(
    "",
    status_code=201,
    response_model=JobPublic,
    responses={200: {"model": JobPublic, "description": "Replayed (same Idempotency-Key)"}}
    | error_responses(409, 422),
    openapi_extra=SPEC_BODY,
)
async def create_job(
    body: Annotated[dict[str, Any], Body(description="the distillation spec")],
    request: Request,
    tenant: TenantDep,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Create a distillation job from a spec; it is validated, queued and sent to a worker."""
    return await submit_job(request.app.state, tenant, body, idempotency_key)


async def submit_job(
    state: State, tenant: Tenant, body: Any, idempotency_key: str | None
) -> Response:
    """What ``POST /v1/jobs`` answers: the new job (201) or the replayed one (200).

    Raises the request's error (``InvalidSpec``, ``Conflict``, …).
    """
    pending = state.job_intake.submit(JobRequest(tenant, body, idempotency_key))
    job, replayed = await asyncio.wrap_future(pending)
    bind_log_context(job_id=job.id)
    if replayed:
        return _replayed(job)
    try:
        state.enqueue(job)
    except Exception:  # noqa: BLE001 - the job is saved; the reconciler sends queued jobs again
        log.warning("could not enqueue %s; the reconciler will send it", job.id, exc_info=True)
    return json_response(job_public(job), status_code=201)


def _replayed(job: Row[Any]) -> Response:
    return json_response(job_public(job), headers={"Idempotent-Replayed": "true"})


@router.get("", response_model=JobList, responses=error_responses(422))
def list_jobs(
    session: SessionDep,
    tenant: TenantDep,
    status: JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(description="the last id of the previous page")] = None,
) -> dict[str, Any]:
    """List the tenant's jobs, newest first (optionally with one status)."""
    query = select(Job).where(Job.tenant_id == tenant.id)
    if status is not None:
        query = query.where(Job.status == status)
    if after:
        query = query.where(Job.id < after)
    rows = list(session.scalars(query.order_by(Job.id.desc()).limit(limit + 1)))
    data, has_more = page(rows, limit)
    return {"data": [job_public(j) for j in data], "has_more": has_more}


def read_job(engine: Engine, job_id: str, tenant: Tenant) -> Row[Any]:
    """The public columns of the tenant's job: one Core query (``engine``: a read engine).

    The busiest read of the API; an ORM session and a mapped instance would cost more than the
    query itself.
    """
    table = Job.__table__
    query = select(*PUBLIC_COLUMNS).where(table.c.id == job_id, table.c.tenant_id == tenant.id)
    row = read_with_retry(engine, query)
    if row is None:
        raise not_found(Job, job_id)
    return row


@router.get("/{job_id}", response_model=JobPublic, responses=error_responses(404))
async def get_job(job_id: str, request: Request, tenant: TenantDep) -> Response:
    """Get a job: status, progress, latest metrics, and the result or error."""
    return await job_response(request.app.state, job_id, tenant)


async def job_response(state: State, job_id: str, tenant: Tenant) -> Response:
    """What ``GET /v1/jobs/{job_id}`` answers; raises ``NotFound`` for another tenant's job."""
    bind_log_context(job_id=job_id)
    row = await run_in_threadpool(read_job, state.read_engine, job_id, tenant)
    return json_response(job_public(row))


@router.post("/{job_id}/cancel", response_model=JobPublic, responses=error_responses(404))
def cancel_job(job: OwnedJobDep, session: SessionDep) -> JobPublic:
    """Cancel a job (idempotent): a queued job stops at once, a running one within seconds."""
    return job_public(request_cancel(session, job))


def _events(session: Session, job_id: str, after: int, limit: int) -> list[JobEvent]:
    return list(
        session.scalars(
            select(JobEvent)
            .where(JobEvent.job_id == job_id, JobEvent.seq > after)
            .order_by(JobEvent.seq)
            .limit(limit)
        )
    )


@router.get(
    "/{job_id}/events",
    response_model=EventList,
    responses=error_responses(404, 422)
    | {200: {"content": {"text/event-stream": {}}, "description": "JSON page, or live SSE"}},
)
def job_events(
    request: Request,
    job: OwnedJobDep,
    session: SessionDep,
    after: Annotated[
        int, Query(ge=0, le=MAX_SEQ, description="return events with seq > after")
    ] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> Any:
    """The job's events in seq order; with `Accept: text/event-stream`, streamed live (SSE)."""
    if "text/event-stream" in request.headers.get("accept", ""):
        start = _last_event_id(last_event_id) if last_event_id else after
        return StreamingResponse(
            _sse(request, job.id, start),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    rows = _events(session, job.id, after, limit + 1)
    data, has_more = page(rows, limit)
    return {"data": [EventPublic.model_validate(e) for e in data], "has_more": has_more}


def _last_event_id(value: str) -> int:
    """The seq a reconnecting stream resumes after; InvalidRequest for anything else."""
    value = value.strip()
    if not (value.isascii() and value.isdigit() and len(value) <= 10 and int(value) <= MAX_SEQ):
        raise InvalidRequest(
            f"Last-Event-ID must be the id of an event this stream sent (an integer from 0 to "
            f"{MAX_SEQ}); reconnect without it to start from the beginning",
            field="Last-Event-ID",
        )
    return int(value)


async def _sse(request: Request, job_id: str, after: int) -> AsyncIterator[str]:
    """Server-sent events: each event with ``id: <seq>``; ends after the terminal status event."""
    sessions = request.app.state.sessions
    poll = getattr(request.app.state, "sse_poll_seconds", SSE_POLL_SECONDS)
    keepalive = getattr(request.app.state, "sse_keepalive_seconds", SSE_KEEPALIVE_SECONDS)
    loop = asyncio.get_running_loop()
    last_sent = loop.time()
    yield "retry: 2000\n\n"

    def read(after: int) -> tuple[list[JobEvent], str | None]:
        with sessions() as session:
            events = _events(session, job_id, after, 500)
            status = session.scalar(select(Job.status).where(Job.id == job_id))
            return events, status

    while True:
        events, status = await run_in_threadpool(read, after)
        for event in events:
            after = event.seq
            payload = EventPublic.model_validate(event).model_dump(mode="json")
            yield f"id: {event.seq}\nevent: {event.type}\ndata: {json.dumps(payload)}\n\n"
            last_sent = loop.time()
            if event.type == "status" and event.data.get("status") in TERMINAL_STATUSES:
                return
        if not events and (status is None or status in TERMINAL_STATUSES):
            return  # finished without a final status event (or the job is gone)
        if await request.is_disconnected():
            return
        if loop.time() - last_sent >= keepalive:
            yield ": keep-alive\n\n"
            last_sent = loop.time()
        await asyncio.sleep(poll)
