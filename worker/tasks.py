"""Celery tasks: thin shells that load by id, hand off, and record the outcome."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import uuid
from typing import Any

from core.config import get_settings
from core.db import session_factory
from core.errors import DistillError, job_error
from core.jobs import claim_job, fail_job
from worker.celery_app import RECONCILE_TASK, RUN_JOB_TASK, celery_app

log = logging.getLogger(__name__)


def lease_owner_id() -> str:
    """Who holds a lease: host, process, thread and a nonce (unique per run)."""
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}:{uuid.uuid4().hex[:8]}"


@celery_app.task(name=RUN_JOB_TASK, ignore_result=True)
def run_job(job_id: str) -> str:
    """Claim the job and run it; a second delivery of the same id finds it claimed and returns.

    Returns how the run ended (:class:`worker.runner.RunEnd`), or ``skipped``.
    """
    from worker.checkpoints import delete_checkpoints
    from worker.runner import open_storage, run_claimed_job

    settings = get_settings()
    sessions = session_factory(settings.database)
    owner = lease_owner_id()
    with sessions() as session:
        job = claim_job(session, job_id, owner, settings.lease_seconds)
    if job is None:
        log.info("job %s is not queued (already claimed, cancelled or finished); skipping", job_id)
        return "skipped"
    try:
        return run_claimed_job(job_id, owner, settings=settings, session_factory=sessions)
    except Exception as exc:
        # Write the job's error first, then let Celery log what was unexpected.
        with sessions() as session:
            fail_job(session, job_id, job_error(exc), owner=owner)
        with contextlib.suppress(Exception):
            delete_checkpoints(open_storage(settings), job_id)
        if isinstance(exc, DistillError):
            log.info("job %s failed: %s", job_id, exc)
            return "failed"
        raise
    finally:
        _settle_search(sessions, job_id)


def _settle_search(sessions: Any, job_id: str) -> None:
    """Settle the budget search this job is a trial of, if it was its last active child (the
    reconciler does it otherwise)."""
    from core.searches import search_of_job, settle_search

    try:
        with sessions() as session:
            if (search_id := search_of_job(session, job_id)) is not None:
                settle_search(session, search_id)
    except Exception:  # noqa: BLE001 - the reconciler's next pass settles it
        log.warning("could not settle the search of job %s", job_id, exc_info=True)


@celery_app.task(name=RECONCILE_TASK, ignore_result=True)
def reconcile() -> dict[str, int]:
    """One reconciler pass (scheduled by beat every ``reconcile_seconds``)."""
    from worker.reconciler import reconcile as reconcile_once

    settings = get_settings()
    return reconcile_once(session_factory(settings.database), settings)
