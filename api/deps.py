"""Request dependencies as ``Annotated`` aliases: settings, session, tenant, storage, ownership."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.auth import DEFAULT_TENANT, authenticate, get_or_create_tenant
from core.config import Settings
from core.errors import NotFound, Unauthorized
from core.logging import bind_log_context
from core.models import Artifact, Dataset, Job, Model, Tenant
from core.storage import Storage

log = logging.getLogger("distill.api")

EnqueueFn = Callable[[Session, Job], None]


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    session = request.app.state.sessions()
    try:
        yield session
    finally:
        session.close()


def get_storage(request: Request) -> Storage:
    return request.app.state.storage


def default_enqueue(session: Session, job: Job) -> None:
    """Send the job to its queue through the worker's Celery app."""
    from worker.dispatch import enqueue_job  # the broker client is only needed here

    enqueue_job(session, job)


def get_enqueue(request: Request) -> EnqueueFn:
    return request.app.state.enqueue


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
StorageDep = Annotated[Storage, Depends(get_storage)]
EnqueueDep = Annotated[EnqueueFn, Depends(get_enqueue)]


def get_tenant(request: Request, session: SessionDep, settings: SettingsDep) -> Tenant:
    """The caller's tenant, from ``Authorization: Bearer <key>`` (or ``default`` with auth off)."""
    if settings.auth == "off":
        tenant = session.scalar(select(Tenant).where(Tenant.name == DEFAULT_TENANT))
        if tenant is None:  # first request: create it (commit only then)
            tenant = get_or_create_tenant(session, DEFAULT_TENANT)
            session.commit()
        bind_log_context(tenant=tenant.id)
        return tenant
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized(
            "missing API key; send the header 'Authorization: Bearer <key>' "
            "(create a key with `distill keys create --tenant NAME`)"
        )
    tenant = authenticate(session, key.strip())
    bind_log_context(tenant=tenant.id)
    return tenant


TenantDep = Annotated[Tenant, Depends(get_tenant)]

R = TypeVar("R", Model, Dataset, Job, Artifact)
_LABELS = {Model: "model", Dataset: "dataset", Job: "job", Artifact: "artifact"}


def get_owned(session: Session, cls: type[R], id: str, tenant: Tenant) -> R:
    """The row with this id if the tenant owns it; NotFound otherwise (never 403: no leaks)."""
    row = session.scalar(select(cls).where(cls.id == id, cls.tenant_id == tenant.id))
    if row is None:
        label = _LABELS[cls]
        raise NotFound(
            f"no {label} '{id}'; list yours with GET /v1/{label}s",
            details={"id": id, "resource": label},
        )
    if isinstance(row, Job | Artifact):
        bind_log_context(job_id=row.id if isinstance(row, Job) else row.job_id)
    return row


def owned_model(model_id: str, session: SessionDep, tenant: TenantDep) -> Model:
    return get_owned(session, Model, model_id, tenant)


def owned_dataset(dataset_id: str, session: SessionDep, tenant: TenantDep) -> Dataset:
    return get_owned(session, Dataset, dataset_id, tenant)


def owned_job(job_id: str, session: SessionDep, tenant: TenantDep) -> Job:
    return get_owned(session, Job, job_id, tenant)


def owned_artifact(artifact_id: str, session: SessionDep, tenant: TenantDep) -> Artifact:
    return get_owned(session, Artifact, artifact_id, tenant)


OwnedModelDep = Annotated[Model, Depends(owned_model)]
OwnedDatasetDep = Annotated[Dataset, Depends(owned_dataset)]
OwnedJobDep = Annotated[Job, Depends(owned_job)]
OwnedArtifactDep = Annotated[Artifact, Depends(owned_artifact)]


def page(rows: list[Any], limit: int) -> tuple[list[Any], bool]:
    """Split ``limit + 1`` fetched rows into the page and ``has_more``."""
    return rows[:limit], len(rows) > limit
