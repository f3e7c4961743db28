"""The reconciler: makes the database and the broker agree again (docs/ARCHITECTURE.md).

It re-sends queued jobs whose message the broker lost (a Redis restart without persistence) and
settles running jobs whose heartbeat stopped (a killed worker): back to the queue while attempts
remain, else failed with ``worker_lost``. Every step is a conditional update, so two reconcilers
running at once do each thing once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from core.config import Settings
from core.jobs import RUNNING_STATUSES, claim_resend, requeue_stale
from core.models import Job, utcnow
from core.searches import settle_finished_searches

log = logging.getLogger(__name__)

SendFn = Callable[[str, str], None]  # (job_id, queue)


def reconcile(
    session_factory: sessionmaker[Session],
    settings: Settings,
    now: datetime | None = None,
    *,
    send: SendFn | None = None,
    storage: Any | None = None,
) -> dict[str, int]:
    """One pass; returns counts: ``resent``, ``requeued``, ``failed``, ``cancelled`` (jobs) and
    ``searches`` (budget searches settled because their last child had ended)."""
    if send is None:
        from worker.dispatch import send_job as send
    now = now or utcnow()
    counts = {"resent": 0, "requeued": 0, "failed": 0, "cancelled": 0, "searches": 0}
    stale_before = now - timedelta(seconds=settings.lease_seconds)
    with session_factory() as session:
        stale = session.execute(
            select(Job.id, Job.queue).where(
                Job.status.in_(RUNNING_STATUSES),
                or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < stale_before),
            )
        ).all()
        for job_id, queue in stale:
            outcome = requeue_stale(
                session,
                job_id,
                stale_before=stale_before,
                max_attempts=settings.max_attempts,
                now=now,
            )
            if outcome is None:
                continue
            counts[outcome] += 1
            log.warning("job %s: heartbeat stopped; %s", job_id, outcome)
            if outcome == "requeued":
                _send(send, job_id, queue)
            else:
                _forget_checkpoints(settings, storage, job_id)

        sent_before = now - timedelta(seconds=settings.requeue_after_seconds)
        lost = session.execute(
            select(Job.id, Job.queue).where(
                Job.status == "queued",
                func.coalesce(Job.enqueued_at, Job.created_at) < sent_before,
            )
        ).all()
        for job_id, queue in lost:
            if claim_resend(session, job_id, sent_before=sent_before, now=now):
                counts["resent"] += 1
                log.info(
                    "job %s: still queued after %ss; sent again",
                    job_id,
                    settings.requeue_after_seconds,
                )
                _send(send, job_id, queue)
        # A search whose last child ended without a worker to settle it (cancelled while
        # queued, failed by this pass, or its worker died after the child ended).
        counts["searches"] = settle_finished_searches(session)
    return counts


def _send(send: SendFn, job_id: str, queue: str) -> None:
    try:
        send(job_id, queue)
    except Exception:  # noqa: BLE001 - the broker is down; the next pass re-sends
        log.warning("could not send %s to the broker", job_id, exc_info=True)


def _forget_checkpoints(settings: Settings, storage: Any | None, job_id: str) -> None:
    from worker.checkpoints import delete_checkpoints
    from worker.runner import open_storage

    try:
        delete_checkpoints(storage or open_storage(settings), job_id)
    except Exception:  # noqa: BLE001 - leftovers cost space, not correctness
        log.warning("could not delete the checkpoints of %s", job_id, exc_info=True)
