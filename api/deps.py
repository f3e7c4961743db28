"""Request dependencies as ``Annotated`` aliases: settings, session, tenant, storage, ownership."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Header, Request
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.tenants import TenantResolver
from core.config import Settings
from core.errors import NotFound
from core.job_creation import MAX_IDEMPOTENCY_KEY_LENGTH
from core.logging import bind_log_context
from core.models import Artifact, Dataset, Job, Model, Tenant
from core.storage import Storage

log = logging.getLogger("distill.api")

# The dependencies below that do no I/O are ``async def``: FastAPI runs a plain ``def`` dependency
# in a worker thread, and each such hop costs more CPU than the work of a simple request. Database
# work runs in threads (a busy SQLite file may block for seconds).


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_session(request: Request) -> AsyncIterator[Session]:
    session = request.app.state.sessions()  # no connection until the first query
    try:
        yield session
    finally:
        if session.in_transaction():  # returning the connection rolls back: database I/O
            await run_in_threadpool(session.close)
        else:
            session.close()


async def get_storage(request: Request) -> Storage:
    return request.app.state.storage


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
StorageDep = Annotated[Storage, Depends(get_storage)]


async def get_tenant(request: Request) -> Tenant:
    """The caller's tenant, from ``Authorization: Bearer <key>`` (or ``default`` with auth off).

    A detached snapshot (id, name): compare and copy ``tenant.id``, never attach it to a session.
    """
    resolver: TenantResolver = request.app.state.tenants
    authorization = request.headers.get("authorization", "")
    tenant = resolver.cached(authorization) or await run_in_threadpool(
        resolver.resolve, authorization
    )
    bind_log_context(tenant=tenant.id)
    return tenant


TenantDep = Annotated[Tenant, Depends(get_tenant)]

R = TypeVar("R", Model, Dataset, Job, Artifact)
_LABELS = {Model: "model", Dataset: "dataset", Job: "job", Artifact: "artifact"}


def get_owned(session: Session, cls: type[R], id: str, tenant: Tenant) -> R:
    """The row with this id if the tenant owns it; NotFound otherwise (never 403: no leaks)."""
    row = session.scalar(select(cls).where(cls.id == id, cls.tenant_id == tenant.id))
    if row is None:
        raise not_found(cls, id)
    if isinstance(row, Job | Artifact):
        bind_log_context(job_id=row.id if isinstance(row, Job) else row.job_id)
    return row


def not_found(cls: type[Any], id: str) -> NotFound:
    label = _LABELS[cls]
    return NotFound(
        f"no {label} '{id}'; list yours with GET /v1/{label}s",
        details={"id": id, "resource": label},
    )


def load_owned(sessions: Callable[[], Session], cls: type[R], id: str, tenant: Tenant) -> R:
    """:func:`get_owned` in a session of its own: the row comes back loaded and detached.

    A handler that writes uses its own session (``SessionDep``); ``session.delete`` and
    updates by id work on the detached row.
    """
    with sessions() as session:
        return get_owned(session, cls, id, tenant)


# One thread hop and a short session each, not a request-long session: a plain-``def``
# dependency costs its own hop, and a ``yield`` dependency more bookkeeping than a simple read.


async def owned_model(model_id: str, request: Request, tenant: TenantDep) -> Model:
    return await run_in_threadpool(load_owned, request.app.state.sessions, Model, model_id, tenant)


async def owned_dataset(dataset_id: str, request: Request, tenant: TenantDep) -> Dataset:
    return await run_in_threadpool(
        load_owned, request.app.state.sessions, Dataset, dataset_id, tenant
    )


async def owned_job(job_id: str, request: Request, tenant: TenantDep) -> Job:
    return await run_in_threadpool(load_owned, request.app.state.sessions, Job, job_id, tenant)


async def owned_artifact(artifact_id: str, request: Request, tenant: TenantDep) -> Artifact:
    return await run_in_threadpool(
        load_owned, request.app.state.sessions, Artifact, artifact_id, tenant
    )


OwnedModelDep = Annotated[Model, Depends(owned_model)]
OwnedDatasetDep = Annotated[Dataset, Depends(owned_dataset)]
OwnedJobDep = Annotated[Job, Depends(owned_job)]
OwnedArtifactDep = Annotated[Artifact, Depends(owned_artifact)]


def page(rows: list[Any], limit: int) -> tuple[list[Any], bool]:
    """Split ``limit + 1`` fetched rows into the page and ``has_more``."""
    return rows[:limit], len(rows) > limit


# The Idempotency-Key header of a create (a job, a search); its bounds are the hot path's too.
IdempotencyKeyHeader = Annotated[
    str | None,
    Header(alias="Idempotency-Key", min_length=1, max_length=MAX_IDEMPOTENCY_KEY_LENGTH),
]
