"""Idempotency-Keys: the job a key made before, for each request that sends one."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Row, delete, select

from core.errors import Conflict
from core.job_creation.request import JobRequest
from core.models import IdempotencyKey, Job, as_utc

IDEMPOTENCY_TTL = timedelta(hours=24)

JOBS, KEYS = Job.__table__, IdempotencyKey.__table__


def earlier_jobs(conn: Connection, requests: list[JobRequest]) -> list[Row[Any] | Conflict | None]:
    """For each request, the job its Idempotency-Key made before (a ``Conflict`` if the body
    differs), or None. Expired keys are deleted in the caller's transaction: new jobs take them.
    """
    keys = {r.idempotency_key for r in requests if r.idempotency_key is not None}
    if not keys:
        return [None] * len(requests)
    remembered = {
        (row.tenant_id, row.key): row
        for row in conn.execute(
            select(
                KEYS.c.tenant_id, KEYS.c.key, KEYS.c.created_at, KEYS.c.request_hash, KEYS.c.job_id
            ).where(KEYS.c.key.in_(keys))
        )
    }
    oldest = datetime.now(UTC) - IDEMPOTENCY_TTL
    for (tenant_id, key), row in list(remembered.items()):
        if as_utc(row.created_at) < oldest:
            conn.execute(delete(KEYS).where(KEYS.c.tenant_id == tenant_id, KEYS.c.key == key))
            del remembered[(tenant_id, key)]
    job_ids = {row.job_id for row in remembered.values()}
    jobs = (
        {row.id: row for row in conn.execute(select(JOBS).where(JOBS.c.id.in_(job_ids)))}
        if job_ids
        else {}
    )
    earlier: list[Row[Any] | Conflict | None] = []
    for request in requests:
        row = remembered.get((request.tenant.id, request.idempotency_key))
        if row is None:
            earlier.append(None)
        elif row.request_hash != request.digest:
            earlier.append(
                Conflict(
                    f"Idempotency-Key '{request.idempotency_key}' was already used with a "
                    "different request body; use a new key for a new job",
                    details={"job_id": row.job_id},
                )
            )
        else:
            earlier.append(jobs[row.job_id])
    return earlier
