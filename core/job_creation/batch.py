"""Creating the jobs of many requests at once: one lookup, one insert and one commit for all.

Each request still gets its own answer: its new job, the job its Idempotency-Key made before,
or the error that says why not. A batch that a database constraint or value refuses is taken
again one request at a time, so that only the request at fault fails.
"""

from __future__ import annotations

from contextlib import suppress
from types import SimpleNamespace
from typing import Any, NamedTuple, cast

from sqlalchemy import Connection, Row, func, select

from core.config import Settings
from core.errors import ClientError, InvalidSpec, QuotaExceeded
from core.job_creation.idempotency import earlier_jobs
from core.job_creation.request import JobRequest
from core.job_creation.rows import job_inserts, new_job_row
from core.job_creation.statements import JobStatements
from core.job_creation.uploads import Uploads, resolve_spec
from core.models import ACTIVE_STATUSES, Job
from core.spec import JobSpec, parse_spec

# When a tenant at its quota of queued and running jobs is told to try again.
RETRY_AFTER_SECONDS = 30

JOBS = Job.__table__


class StoredJob(NamedTuple):
    """A request's job, as its columns (a new job's by name, an earlier one's as the row its
    Idempotency-Key names), and whether it is that earlier job (a replay)."""

    job: SimpleNamespace | Row[Any]
    replayed: bool


# What a request gets: its job, or the error that says why not.
JobOrError = StoredJob | Exception


def create_jobs(
    conn: Connection,
    statements: JobStatements,
    requests: list[JobRequest],
    settings: Settings,
    *,
    retry: bool = True,
) -> list[JobOrError]:
    """Check and store the jobs of these requests; a job or an error for each, in order.

    A request whose Idempotency-Key was used before gets that earlier job (or ``Conflict`` if
    its body differs); one whose spec is wrong gets ``InvalidSpec`` naming the field. The
    others' jobs are committed together.
    """
    try:
        return _create_together(conn, statements, requests, settings)
    except statements.data_errors as exc:
        _rollback(conn)
        if len(requests) > 1:
            # One request's value fails the batch's statement: each on its own, so that only
            # that request fails.
            return [_create_one(conn, statements, request, settings) for request in requests]
        return [
            InvalidSpec(
                "the database refused a value of this spec; check its text and numbers "
                f"({_first_line(exc)})",
                field="",
            )
        ]
    except statements.integrity_errors as exc:
        _rollback(conn)
        if len(requests) > 1:
            # A key was used twice (by two requests of this batch, or raced by another process),
            # or an upload was deleted since the lookup. Each on its own, then: the first to
            # commit owns the key, the others replay it; a deleted upload fails its own request.
            return [_create_one(conn, statements, request, settings) for request in requests]
        earlier = earlier_jobs(conn, requests)[0]
        _rollback(conn)
        if earlier is not None:
            return [StoredJob(earlier, True) if isinstance(earlier, Row) else earlier]
        if not retry:
            return [exc]
        # Not a key: a model or the dataset was deleted between the lookup and the insert
        # (the foreign keys refused the job). Looked up again, it is missing, and the
        # request gets the error that names it.
        return create_jobs(conn, statements, requests, settings, retry=False)


def _first_line(exc: BaseException) -> str:
    """The database's own words, without SQLAlchemy's statement and parameters."""
    orig = getattr(exc, "orig", None) or exc
    return str(orig).strip().splitlines()[0][:200] if str(orig).strip() else type(orig).__name__


def _create_one(
    conn: Connection, statements: JobStatements, request: JobRequest, settings: Settings
) -> JobOrError:
    """One request's job created by itself; an error is its own (others may have committed)."""
    try:
        return create_jobs(conn, statements, [request], settings)[0]
    except Exception as exc:  # noqa: BLE001 - e.g. the database went away mid-batch
        with suppress(Exception):
            _rollback(conn)
        return exc


def _create_together(
    conn: Connection, statements: JobStatements, requests: list[JobRequest], settings: Settings
) -> list[JobOrError]:
    answers: list[JobOrError | None] = [None] * len(requests)
    specs: dict[int, JobSpec] = {}
    for i, earlier in enumerate(earlier_jobs(conn, requests)):
        if isinstance(earlier, Row):
            answers[i] = StoredJob(earlier, True)
        elif earlier is not None:
            answers[i] = earlier
        else:
            try:
                specs[i] = parse_spec(requests[i].body)
            except ClientError as exc:
                answers[i] = exc
    uploads = Uploads(conn, statements, list(specs.values()))
    active = _active_jobs(conn, {requests[i].tenant.id for i in specs})
    limit = settings.max_active_jobs_per_tenant
    new_jobs: list[tuple[dict[str, Any], list[str]]] = []
    for i, spec in specs.items():
        request = requests[i]
        try:
            completed, model_ids = resolve_spec(uploads, request.tenant, spec, settings)
            if (running := active.get(request.tenant.id, 0)) >= limit:
                raise QuotaExceeded(
                    f"this tenant has {running} queued or running jobs and may have at most "
                    f"{limit}; submit again when one has finished (or cancel one)",
                    retry_after=RETRY_AFTER_SECONDS,
                    details={"limit": limit, "active": running},
                )
        except ClientError as exc:
            answers[i] = exc
            continue
        active[request.tenant.id] = active.get(request.tenant.id, 0) + 1
        row = new_job_row(
            request.tenant.id, completed, settings, request.idempotency_key, request.digest
        )
        new_jobs.append((row, model_ids))
        answers[i] = StoredJob(SimpleNamespace(**row), False)
    if new_jobs:
        # On PostgreSQL one statement, committed by itself; elsewhere committed below.
        statements.insert(conn, job_inserts(new_jobs))
    _commit(conn)  # also an expired key's deletion
    return cast(list[JobOrError], answers)  # every request has its answer by now


def _active_jobs(conn: Connection, tenant_ids: set[str]) -> dict[str, int]:
    """Each tenant's queued and running jobs (one query per batch).

    Two API processes may each admit a job at the limit at once: the quota can be passed by
    a batch or two, never by a flood.
    """
    if not tenant_ids:
        return {}
    query = (
        select(JOBS.c.tenant_id, func.count())
        .where(JOBS.c.tenant_id.in_(tenant_ids), JOBS.c.status.in_(ACTIVE_STATUSES))
        .group_by(JOBS.c.tenant_id)
    )
    return {tenant_id: count for tenant_id, count in conn.execute(query)}


def _commit(conn: Connection) -> None:
    """Commit through SQLAlchemy and at the driver: statements sent around SQLAlchemy may have
    begun a transaction that it does not know of."""
    conn.commit()
    conn.connection.driver_connection.commit()


def _rollback(conn: Connection) -> None:
    conn.rollback()
    conn.connection.driver_connection.rollback()
