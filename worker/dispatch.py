"""Send a job id to the broker. Imported by the API: keep torch off this import path."""

from __future__ import annotations

import logging

from celery import Celery
from sqlalchemy.orm import Session

from core.models import Job, utcnow

log = logging.getLogger(__name__)


def send_job(job_id: str, queue: str, *, app: Celery | None = None) -> None:
    """Put a job id on its queue (``distill.run_job``)."""
    from worker.celery_app import RUN_JOB_TASK

    if app is None:
        from worker.celery_app import celery_app as app
    app.send_task(RUN_JOB_TASK, args=[job_id], queue=queue)


def enqueue_job(session: Session, job: Job, *, app: Celery | None = None) -> None:
    """Record ``enqueued_at``, commit (so a worker finds the row), then send the job's id.

    A broker that is down does not fail the request: the job stays queued and the reconciler
    sends it again once ``requeue_after_seconds`` have passed.
    """
    if job.enqueued_at is None:  # the API records it with the job, saving a commit
        job.enqueued_at = utcnow()
        session.commit()
    try:
        send_job(job.id, job.queue, app=app)
    except Exception:  # noqa: BLE001 - any broker failure; the reconciler re-sends
        log.warning(
            "could not send %s to the broker; the reconciler will retry", job.id, exc_info=True
        )
