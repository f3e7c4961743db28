"""Taking in a budget search: its candidates proposed, then the search and its child jobs
stored in one transaction.

Each child is an ordinary job, checked and completed exactly as ``POST /v1/jobs`` checks one
(``core/job_creation``: the tenant's uploads, the spec, the service's budget), stored with its
links and first event, and sent to the broker like any job once committed; a lost send is
re-sent by the reconciler. The children count against the tenant's quota of active jobs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from core.config import Settings
from core.errors import Conflict, InvalidSpec, OverBudget, QuotaExceeded
from core.job_creation import RETRY_AFTER_SECONDS, request_hash, statements_for
from core.job_creation.rows import new_job_row
from core.job_creation.uploads import Uploads, _model_for, model_info, resolve_spec
from core.models import (
    ACTIVE_STATUSES,
    Job,
    JobDataset,
    JobEvent,
    JobModel,
    Search,
    SearchJob,
    Tenant,
    new_id,
    utcnow,
)
from core.search import Candidate, SearchRequest, child_spec, parse_search, propose
from core.spec import DatasetInfo, JobSpec, parse_spec


@dataclass(frozen=True)
class StoredSearch:
    """The stored search, its children to send (id, queue), and whether it is a replay."""

    search_id: str
    to_send: list[tuple[str, str]]
    replayed: bool


def store_search(
    sessions: sessionmaker[Session],
    settings: Settings,
    tenant: Tenant,
    body: Any,
    idempotency_key: str | None,
) -> StoredSearch:
    """Validate, propose and store a search; raises the request's ``ClientError``."""
    digest = request_hash(body) if idempotency_key is not None else None
    with sessions() as session:
        if idempotency_key is not None and (earlier := _replay(session, tenant, idempotency_key)):
            return _replay_of(earlier, digest, idempotency_key)
        request = parse_search(body)
        conn = session.connection()
        uploads = Uploads(conn, statements_for(conn.dialect), [request.spec])
        teachers, dataset = _inputs(uploads, tenant, request.spec, settings)
        candidates, over = propose(request, teachers, dataset)
        search_id = new_id("srch")
        label = request.spec.name or search_id
        children, skipped = _children(uploads, tenant, request, candidates, label, settings)
        skipped = [{**c.as_dict(), "reason": "over the search's budget"} for c in over] + skipped
        if not children:
            raise InvalidSpec(
                "no candidate student fits this budget; raise budget.max_parameters or "
                "budget.max_size_bytes, or list smaller widths and depths in space",
                field="budget",
                details={"skipped": skipped[:20]},
            )
        _check_quota(session, tenant, len(children), settings)
        now = utcnow()
        session.add(
            Search(
                id=search_id,
                tenant_id=tenant.id,
                name=request.spec.name,
                status="running",
                request=body,
                plan={"candidates": [c.as_dict() for c, _, _ in children], "skipped": skipped},
                cancel_requested=False,
                idempotency_key=idempotency_key,
                request_hash=digest,
                created_at=now,
            )
        )
        session.flush()  # the search's row before the links that name it
        to_send = [
            _add_child(session, tenant, search_id, spec, ids, settings) for _, spec, ids in children
        ]
        try:
            session.commit()
        except IntegrityError:
            session.rollback()
            if idempotency_key is not None and (
                earlier := _replay(session, tenant, idempotency_key)
            ):
                return _replay_of(earlier, digest, idempotency_key)
            raise Conflict(
                "a model or the dataset this search uses was deleted while it was submitted; "
                "upload it again"
            ) from None
        return StoredSearch(search_id, to_send, replayed=False)


def _inputs(
    uploads: Uploads, tenant: Tenant, spec: JobSpec, settings: Settings
) -> tuple[list[Any], DatasetInfo]:
    """The teachers' and the dataset's recorded shapes, after the base spec is checked as a
    job (the errors name the same fields as ``POST /v1/jobs``)."""
    resolve_spec(uploads, tenant, spec, settings)
    teachers = [
        model_info(_model_for(uploads, tenant, ref, name)) for name, ref in spec.teacher_fields()
    ]
    info = uploads.dataset_info(tenant, spec.dataset_id or "")
    assert info is not None  # resolve_spec checked it
    return teachers, DatasetInfo.model_validate(info)


def _children(
    uploads: Uploads,
    tenant: Tenant,
    request: SearchRequest,
    candidates: list[Candidate],
    label: str,
    settings: Settings,
) -> tuple[list[tuple[Candidate, JobSpec, list[str]]], list[dict[str, Any]]]:
    """Each candidate's completed job spec; those over the service's budget are skipped."""
    children: list[tuple[Candidate, JobSpec, list[str]]] = []
    skipped: list[dict[str, Any]] = []
    for i, candidate in enumerate(candidates):
        spec = parse_spec(child_spec(request, candidate, f"{label} trial {i + 1}"))
        try:
            completed, model_ids = resolve_spec(uploads, tenant, spec, settings)
        except OverBudget as exc:
            skipped.append({**candidate.as_dict(), "reason": exc.message})
            continue
        children.append((candidate, completed, model_ids))
    return children, skipped


def _check_quota(session: Session, tenant: Tenant, count: int, settings: Settings) -> None:
    limit = settings.max_active_jobs_per_tenant
    active = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(Job.tenant_id == tenant.id, Job.status.in_(ACTIVE_STATUSES))
    )
    if (active or 0) + count > limit:
        raise QuotaExceeded(
            f"this search runs {count} jobs and the tenant has {active} queued or running; it "
            f"may have at most {limit}: ask for fewer trials, or submit again when jobs finish",
            retry_after=RETRY_AFTER_SECONDS,
            details={"limit": limit, "active": active, "trials": count},
        )


def _add_child(
    session: Session,
    tenant: Tenant,
    search_id: str,
    spec: JobSpec,
    model_ids: list[str],
    settings: Settings,
) -> tuple[str, str]:
    columns = new_job_row(tenant.id, spec, settings)
    session.add(Job(**columns))
    session.flush()
    session.add_all(JobModel(job_id=columns["id"], model_id=m) for m in model_ids)
    session.add(JobDataset(job_id=columns["id"], dataset_id=spec.dataset_id))
    session.add(SearchJob(job_id=columns["id"], search_id=search_id))
    session.add(
        JobEvent(
            job_id=columns["id"],
            seq=1,
            type="status",
            data={"status": "queued", "search_id": search_id},
            at=columns["created_at"],
        )
    )
    return columns["id"], columns["queue"]


def _replay(session: Session, tenant: Tenant, key: str) -> Search | None:
    return session.scalar(
        select(Search).where(Search.tenant_id == tenant.id, Search.idempotency_key == key)
    )


def _replay_of(earlier: Search, digest: str | None, key: str) -> StoredSearch:
    if earlier.request_hash != digest:
        raise Conflict(
            f"Idempotency-Key '{key}' was already used with a different request body; use a "
            "new key for a new search",
            details={"search_id": earlier.id},
        )
    return StoredSearch(earlier.id, [], replayed=True)
