"""Jobs: create (validated against the tenant's models and datasets), list, get, cancel, events."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from sqlalchemy import Engine, Row, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.deps import (
    EnqueueDep,
    OwnedJobDep,
    SessionDep,
    SettingsDep,
    TenantDep,
    not_found,
    page,
)
from api.schemas import (
    EventList,
    EventPublic,
    JobList,
    JobPublic,
    JobStatus,
    error_responses,
    json_response,
)
from core.config import Settings
from core.db import read_with_retry
from core.errors import Conflict, InvalidSpec
from core.jobs import request_cancel
from core.logging import bind_log_context
from core.models import (
    Dataset,
    IdempotencyKey,
    Job,
    JobEvent,
    JobModel,
    Model,
    Tenant,
    new_id,
    utcnow,
)
from core.spec import DatasetInfo, JobSpec, ModelInfo, ModelRef, complete_spec, parse_spec

log = logging.getLogger("distill.api")
router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=error_responses(401))

IDEMPOTENCY_TTL = timedelta(hours=24)
TERMINAL = ("succeeded", "failed", "cancelled")
SSE_POLL_SECONDS = 0.5
SSE_KEEPALIVE_SECONDS = 15.0

SPEC_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/JobSpec"}}},
    }
}


# --- validation against what the tenant has uploaded ------------------------------------------


def _model_for(session: Session, tenant: Tenant, ref: ModelRef, field: str) -> Model:
    if ref.path is not None:
        raise InvalidSpec(
            f"'{field}.path' is for `distill run` on local files; upload the model with "
            "POST /v1/models and give its model_id",
            field=f"{field}.path",
        )
    if ref.format is not None or ref.arch is not None:
        which = "format" if ref.format is not None else "arch"
        raise InvalidSpec(
            f"'{field}.{which}' is for local files; the service uses what it recorded when the "
            "model was uploaded, so remove it",
            field=f"{field}.{which}",
        )
    model = session.scalar(
        select(Model).where(Model.id == ref.model_id, Model.tenant_id == tenant.id)
    )
    if model is None:
        raise InvalidSpec(
            f"no model '{ref.model_id}'; upload it with POST /v1/models (GET /v1/models lists "
            "yours)",
            field=f"{field}.model_id",
        )
    return model


def model_info(model: Model) -> ModelInfo:
    """The ModelInfo recorded for an uploaded model."""
    return ModelInfo(
        format=model.format,
        inputs=model.signature["inputs"],
        outputs=model.signature["outputs"],
        trainable=model.trainable,
        arch=model.arch,
    )


def resolve_spec(session: Session, tenant: Tenant, spec: JobSpec) -> tuple[JobSpec, list[str]]:
    """Check every id against the tenant's uploads and complete the spec.

    Returns the completed spec and the ids of the models the job uses.
    """
    teachers: list[Model] = []
    if spec.teacher is not None:
        teachers.append(_model_for(session, tenant, spec.teacher, "teacher"))
    for i, ref in enumerate(spec.teachers or []):
        teachers.append(_model_for(session, tenant, ref, f"teachers.{i}"))

    students: list[tuple[str, Any]] = []
    if spec.student is not None:
        students.append(("student", spec.student))
    for i, stage in enumerate(spec.stages or []):
        students.append((f"stages.{i}.student", stage.student))
    used = [m.id for m in teachers]
    for field, student in students:
        if student.path is not None:
            raise InvalidSpec(
                f"'{field}.path' is for `distill run`; upload the student with POST /v1/models "
                "and give its model_id",
                field=f"{field}.path",
            )
        if student.model_id is None:
            continue
        model = _model_for(session, tenant, ModelRef(model_id=student.model_id), field)
        if not model.trainable:
            raise InvalidSpec(
                f"model '{model.id}' ({model.format}) cannot be trained; a student must be an "
                "exported_program, torchscript or safetensors upload, or a preset",
                field=f"{field}.model_id",
            )
        used.append(model.id)

    if spec.dataset_path is not None:
        raise InvalidSpec(
            "'dataset_path' is for `distill run`; upload the dataset with POST /v1/datasets and "
            "give its dataset_id",
            field="dataset_path",
        )
    dataset = session.scalar(
        select(Dataset).where(Dataset.id == spec.dataset_id, Dataset.tenant_id == tenant.id)
    )
    if dataset is None:
        raise InvalidSpec(
            f"no dataset '{spec.dataset_id}'; upload it with POST /v1/datasets (GET "
            "/v1/datasets lists yours)",
            field="dataset_id",
        )
    completed = complete_spec(
        spec, [model_info(m) for m in teachers], DatasetInfo.model_validate(dataset.info)
    )
    return completed, list(dict.fromkeys(used))


def choose_queue(spec: JobSpec, settings: Settings) -> str:
    """``gpu`` when the job asks for CUDA, or says ``auto`` and GPU workers exist; else ``cpu``."""
    device = spec.training.device
    if device.startswith("cuda") or (device == "auto" and settings.gpu_workers):
        return "gpu"
    return "cpu"


def request_hash(body: Any) -> str:
    return hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _replayed_job(session: Session, tenant: Tenant, key: str, digest: str) -> Job | None:
    """The job an earlier request with this Idempotency-Key created, if still remembered."""
    row = session.scalar(
        select(IdempotencyKey).where(
            IdempotencyKey.tenant_id == tenant.id, IdempotencyKey.key == key
        )
    )
    if row is None:
        return None
    if _aware(row.created_at) < datetime.now(UTC) - IDEMPOTENCY_TTL:
        session.delete(row)
        session.flush()
        return None
    if row.request_hash != digest:
        raise Conflict(
            f"Idempotency-Key '{key}' was already used with a different request body; "
            "use a new key for a new job",
            details={"job_id": row.job_id},
        )
    return session.get(Job, row.job_id)


# --- responses -----------------------------------------------------------------------------------


def job_public(job: Job | Row[Any]) -> JobPublic:
    """The API's job object: progress is filled in with the spec's stage and epoch counts."""
    spec = job.spec or {}
    progress: dict[str, Any] = {
        "stages": len(spec.get("stages") or []) or 1,
        "epochs": (spec.get("training") or {}).get("epochs"),
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
def create_job(
    body: Annotated[dict[str, Any], Body(description="the distillation spec")],
    session: SessionDep,
    tenant: TenantDep,
    settings: SettingsDep,
    enqueue: EnqueueDep,
    idempotency_key: Annotated[
        str | None,
        Header(alias="Idempotency-Key", min_length=1, max_length=200),
    ] = None,
) -> Response:
    """Create a distillation job from a spec; it is validated, queued and sent to a worker."""
    digest = request_hash(body)
    if idempotency_key is not None:
        earlier = _replayed_job(session, tenant, idempotency_key, digest)
        if earlier is not None:
            return _replayed(earlier)

    spec = parse_spec(body)
    completed, model_ids = resolve_spec(session, tenant, spec)
    now = utcnow()
    columns: dict[str, Any] = dict(
        id=new_id("job"),
        tenant_id=tenant.id,
        parent_id=None,
        name=completed.name,
        status="queued",
        queue=choose_queue(completed, settings),
        spec=completed.model_dump(mode="json"),
        progress={},
        metrics={},
        result=None,
        error=None,
        attempt=0,
        cancel_requested=False,
        idempotency_key=idempotency_key,
        request_hash=digest,
        created_at=now,
        enqueued_at=now,  # recorded with the job; the send follows the commit
        started_at=None,
        finished_at=None,
    )
    job = Job(**columns)  # for the response; the row itself is written below
    bind_log_context(job_id=job.id)
    # Core inserts, not the ORM's unit of work: this is the API's busiest write, and on SQLite
    # the writers of a process take turns, so its transaction must be short.
    session.execute(insert(Job.__table__), [columns])
    if model_ids:
        session.execute(
            insert(JobModel.__table__), [{"job_id": job.id, "model_id": m} for m in model_ids]
        )
    session.execute(
        insert(JobEvent.__table__),
        [{"job_id": job.id, "seq": 1, "type": "status", "data": {"status": "queued"}, "at": now}],
    )
    if idempotency_key is not None:
        session.execute(
            insert(IdempotencyKey.__table__),
            [
                {
                    "tenant_id": tenant.id,
                    "key": idempotency_key,
                    "request_hash": digest,
                    "job_id": job.id,
                    "created_at": now,
                }
            ],
        )
    try:
        session.commit()
    except IntegrityError:
        # The same key raced us; whoever committed first owns it.
        session.rollback()
        earlier = (
            _replayed_job(session, tenant, idempotency_key, digest) if idempotency_key else None
        )
        if earlier is None:
            raise
        return _replayed(earlier)

    try:
        enqueue(job)
    except Exception:  # noqa: BLE001 - the job is saved; the reconciler sends queued jobs again
        log.warning("could not enqueue %s; the reconciler will send it", job.id, exc_info=True)
    return json_response(job_public(job), status_code=201)


def _replayed(job: Job) -> Response:
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


# The columns of a job that its public form shows (``job_public`` reads them by name).
_PUBLIC_COLUMNS = [
    Job.__table__.c[name] for name in JobPublic.model_fields if name in Job.__table__.c
]


def read_job(engine: Engine, job_id: str, tenant: Tenant) -> Row[Any]:
    """The public columns of the tenant's job: one Core query (``engine``: a read engine).

    The busiest read of the API; an ORM session and a mapped instance would cost more than the
    query itself.
    """
    table = Job.__table__
    query = select(*_PUBLIC_COLUMNS).where(table.c.id == job_id, table.c.tenant_id == tenant.id)
    row = read_with_retry(engine, query)
    if row is None:
        raise not_found(Job, job_id)
    return row


@router.get("/{job_id}", response_model=JobPublic, responses=error_responses(404))
async def get_job(job_id: str, request: Request, tenant: TenantDep) -> Response:
    """Get a job: status, progress, latest metrics, and the result or error."""
    bind_log_context(job_id=job_id)
    row = await run_in_threadpool(read_job, request.app.state.read_engine, job_id, tenant)
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
    after: Annotated[int, Query(ge=0, description="return events with seq > after")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> Any:
    """The job's events in seq order; with `Accept: text/event-stream`, streamed live (SSE)."""
    if "text/event-stream" in request.headers.get("accept", ""):
        start = int(last_event_id) if last_event_id and last_event_id.isdigit() else after
        return StreamingResponse(
            _sse(request, job.id, start),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    rows = _events(session, job.id, after, limit + 1)
    data, has_more = page(rows, limit)
    return {"data": [EventPublic.model_validate(e) for e in data], "has_more": has_more}


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
            if event.type == "status" and event.data.get("status") in TERMINAL:
                return
        if not events and (status is None or status in TERMINAL):
            return  # finished without a final status event (or the job is gone)
        if await request.is_disconnected():
            return
        if loop.time() - last_sent >= keepalive:
            yield ": keep-alive\n\n"
            last_sent = loop.time()
        await asyncio.sleep(poll)
