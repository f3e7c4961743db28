"""Job state in the database: events, claims, leases and every status transition.

Each transition is one conditional ``UPDATE … WHERE status = …`` (plus the lease owner where it
matters), so concurrent actors (API, workers, reconcilers, redelivered messages) are safe: the
loser's update matches no row and it does nothing. Each transition writes a ``status`` event and
commits its own transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import InstrumentedAttribute, Session

from core.errors import Conflict, WorkerLost
from core.models import (
    ACTIVE_STATUSES,
    Artifact,
    Dataset,
    Job,
    JobDataset,
    JobEvent,
    JobModel,
    Model,
    as_utc,
    new_id,
    utcnow,
)

TERMINAL_STATUSES = ("succeeded", "failed", "cancelled")
RUNNING_STATUSES = ("running", "cancelling")


def add_event(session: Session, job_id: str, type: str, data: dict[str, Any]) -> JobEvent:
    """Append an event with the next sequence number (retrying if a concurrent writer won)."""
    for _ in range(20):
        seq = (
            session.scalar(select(func.max(JobEvent.seq)).where(JobEvent.job_id == job_id)) or 0
        ) + 1
        event = JobEvent(job_id=job_id, seq=seq, type=type, data=data, at=utcnow())
        try:
            with session.begin_nested():
                session.add(event)
            return event
        except IntegrityError:
            continue
    raise RuntimeError(f"could not append an event to {job_id}")


def iso(moment: datetime | None) -> str | None:
    """RFC 3339 UTC text for a timestamp (SQLite hands back naive UTC datetimes)."""
    return None if moment is None else as_utc(moment).astimezone(UTC).isoformat()


def _transition(
    session: Session, job_id: str, conditions: list[Any], values: dict[str, Any]
) -> bool:
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, *conditions)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def _reload(session: Session, job_id: str) -> Job | None:
    return session.get(Job, job_id, populate_existing=True)


def _status_event(session: Session, job_id: str, status: str, **data: Any) -> None:
    attempt = session.scalar(select(Job.attempt).where(Job.id == job_id))
    payload = {"status": status, "attempt": attempt}
    payload.update({k: v for k, v in data.items() if v is not None})
    add_event(session, job_id, "status", payload)


def claim_job(
    session: Session, job_id: str, owner: str, lease_seconds: float, *, now: datetime | None = None
) -> Job | None:
    """queued → running under ``owner``'s lease; None when the job is not queued (anymore)."""
    now = now or utcnow()
    won = _transition(
        session,
        job_id,
        [Job.status == "queued"],
        {
            "status": "running",
            "attempt": Job.attempt + 1,
            "lease_owner": owner,
            "lease_expires_at": now + timedelta(seconds=lease_seconds),
            "heartbeat_at": now,
            "started_at": func.coalesce(Job.started_at, now),
            "error": None,
        },
    )
    if not won:
        session.rollback()
        return None
    _status_event(session, job_id, "running", worker=owner)
    session.commit()
    return _reload(session, job_id)


def heartbeat(
    session: Session, job_id: str, owner: str, lease_seconds: float, *, now: datetime | None = None
) -> bool:
    """Renew the lease; False when it was lost or the job is being cancelled (stop the run)."""
    now = now or utcnow()
    alive = _transition(
        session,
        job_id,
        [Job.status == "running", Job.lease_owner == owner, Job.cancel_requested.is_(False)],
        {"heartbeat_at": now, "lease_expires_at": now + timedelta(seconds=lease_seconds)},
    )
    session.commit()
    return alive


def request_cancel(session: Session, job: Job) -> Job:
    """Cancel a job: queued → cancelled at once, running → cancelling; idempotent."""
    now = utcnow()
    if _transition(
        session,
        job.id,
        [Job.status == "queued"],
        {"status": "cancelled", "cancel_requested": True, "finished_at": now},
    ):
        _status_event(session, job.id, "cancelled", reason="cancel_requested")
    elif _transition(
        session,
        job.id,
        [Job.status == "running"],
        {"status": "cancelling", "cancel_requested": True},
    ):
        _status_event(session, job.id, "cancelling", reason="cancel_requested")
    session.commit()
    return _reload(session, job.id) or job


@dataclass(frozen=True)
class NewArtifact:
    """An artifact already uploaded to storage, to be recorded with the job's success."""

    name: str
    kind: str
    size_bytes: int
    sha256: str
    storage_key: str


def finish_job(
    session: Session,
    job_id: str,
    owner: str,
    result: dict[str, Any],
    artifacts: list[NewArtifact],
) -> bool:
    """running → succeeded with its artifacts, in one transaction, only under ``owner``'s lease."""
    now = utcnow()
    won = _transition(
        session,
        job_id,
        [Job.status == "running", Job.lease_owner == owner, Job.cancel_requested.is_(False)],
        {
            "status": "succeeded",
            "result": result,
            "error": None,
            "finished_at": now,
            "lease_owner": None,
            "lease_expires_at": None,
        },
    )
    if not won:
        session.rollback()
        return False
    job = _reload(session, job_id)
    assert job is not None
    for item in artifacts:
        session.add(
            Artifact(
                id=new_id("art"),
                job_id=job_id,
                tenant_id=job.tenant_id,
                name=item.name,
                kind=item.kind,
                size_bytes=item.size_bytes,
                sha256=item.sha256,
                storage_key=item.storage_key,
                attempt=job.attempt,
                created_at=now,
            )
        )
    _status_event(session, job_id, "succeeded")
    session.commit()
    return True


def fail_job(
    session: Session, job_id: str, error: dict[str, Any], *, owner: str | None = None
) -> bool:
    """running/cancelling → failed with ``error`` ({code, message}); under ``owner`` if given."""
    return _end_run(session, job_id, owner, {"status": "failed", "error": error}, error=error)


def mark_cancelled(
    session: Session, job_id: str, *, owner: str | None = None, reason: str = "cancel_requested"
) -> bool:
    """running/cancelling → cancelled (the run has stopped); under ``owner`` if given."""
    return _end_run(session, job_id, owner, {"status": "cancelled"}, reason=reason)


def _end_run(
    session: Session, job_id: str, owner: str | None, values: dict[str, Any], **event: Any
) -> bool:
    """running/cancelling → ``values["status"]`` with its status event, under ``owner`` if
    given; False (nothing written) when the job is no longer this run's."""
    conditions: list[Any] = [Job.status.in_(RUNNING_STATUSES)]
    if owner is not None:
        conditions.append(Job.lease_owner == owner)
    won = _transition(
        session, job_id, conditions, {**values, "finished_at": utcnow(), "lease_owner": None}
    )
    if not won:
        session.rollback()
        return False
    _status_event(session, job_id, values["status"], **event)
    session.commit()
    return True


def requeue_stale(
    session: Session,
    job_id: str,
    *,
    stale_before: datetime,
    max_attempts: int,
    now: datetime | None = None,
) -> str | None:
    """Settle a job whose heartbeat stopped before ``stale_before`` (its worker is gone).

    running with attempts left → ``"requeued"`` (queued again; the caller re-sends it);
    running with none left → ``"failed"`` (``worker_lost``); cancelling → ``"cancelled"``.
    None when the job is no longer stale (a live worker, or another reconciler, got there first).
    """
    now = now or utcnow()
    job = _reload(session, job_id)
    if job is None or job.status not in RUNNING_STATUSES:
        return None
    stale = [
        Job.status == job.status,
        or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < stale_before),
    ]
    last = iso(job.heartbeat_at)
    cleared = {"lease_owner": None, "lease_expires_at": None}
    if job.status == "cancelling":
        if not _transition(
            session, job_id, stale, {"status": "cancelled", "finished_at": now, **cleared}
        ):
            session.rollback()
            return None
        _status_event(session, job_id, "cancelled", reason="worker_lost", last_heartbeat=last)
        session.commit()
        return "cancelled"
    if job.attempt < max_attempts:
        if not _transition(
            session, job_id, stale, {"status": "queued", "enqueued_at": now, **cleared}
        ):
            session.rollback()
            return None
        _status_event(
            session,
            job_id,
            "queued",
            reason="worker_lost",
            message=f"the worker stopped sending heartbeats (last at {last}); retrying",
            last_heartbeat=last,
        )
        session.commit()
        return "requeued"
    error = WorkerLost(
        f"the worker running this job stopped (last heartbeat at {last}) on each of "
        f"{job.attempt} attempts; it may need more memory than a worker has, or a smaller "
        "batch_size or student"
    ).to_dict()
    if not _transition(
        session, job_id, stale, {"status": "failed", "error": error, "finished_at": now, **cleared}
    ):
        session.rollback()
        return None
    _status_event(session, job_id, "failed", error=error, last_heartbeat=last)
    session.commit()
    return "failed"


def claim_resend(
    session: Session, job_id: str, *, sent_before: datetime, now: datetime | None = None
) -> bool:
    """Take the right to re-send a queued job last sent before ``sent_before`` (one winner)."""
    now = now or utcnow()
    won = _transition(
        session,
        job_id,
        [
            Job.status == "queued",
            func.coalesce(Job.enqueued_at, Job.created_at) < sent_before,
        ],
        {"enqueued_at": now},
    )
    session.commit()
    return won


def delete_upload(session: Session, upload: Model | Dataset) -> None:
    """Delete a model's or a dataset's row and commit; ``Conflict`` (and nothing deleted) while
    a job that has not finished uses it.

    Finished jobs let go of it first. The foreign keys from ``job_models`` and ``job_datasets``
    settle a race with a job being submitted: whichever commits second fails.
    """
    kind, column = _UPLOAD_LINKS[type(upload)]
    upload_id, link = upload.id, column.class_
    finished = select(Job.id).where(Job.status.not_in(ACTIVE_STATUSES))
    session.execute(delete(link).where(column == upload_id, link.job_id.in_(finished)))
    if active := jobs_using(session, column, upload_id):
        session.rollback()
        raise _in_use(kind, upload_id, f"active job(s) {', '.join(active)}", active)
    session.delete(upload)
    try:
        session.commit()
    except IntegrityError:  # a job that uses it was stored meanwhile
        session.rollback()
        raise _in_use(kind, upload_id, "a job submitted just now", []) from None


# How each kind of upload is linked to the jobs that use it.
_UPLOAD_LINKS: dict[type, tuple[str, InstrumentedAttribute[str]]] = {
    Model: ("model", JobModel.model_id),
    Dataset: ("dataset", JobDataset.dataset_id),
}


def jobs_using(session: Session, column: InstrumentedAttribute[str], upload_id: str) -> list[str]:
    """The jobs linked to an upload through ``column`` (``JobModel.model_id`` or
    ``JobDataset.dataset_id``)."""
    return list(session.scalars(select(column.class_.job_id).where(column == upload_id)))


def _in_use(kind: str, upload_id: str, using: str, jobs: list[str]) -> Conflict:
    return Conflict(
        f"{kind} '{upload_id}' is used by {using}; cancel them or wait until they finish",
        details={"jobs": jobs},
    )
