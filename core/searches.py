"""Search state in the database: its trials, settling it when they end, cancelling it.

The database is the source of truth: a search is settled (``running`` → ``succeeded`` /
``failed``, ``cancelling`` → ``cancelled``) by :func:`settle_search` once none of its child
jobs is active, with one conditional update, so the worker that ran the last child and the
reconciler can both try and only one wins. A worker that dies between the two leaves nothing
lost: the reconciler's next pass settles it (:func:`settle_finished_searches`).
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import exists, select, update
from sqlalchemy.orm import Session

from core.jobs import request_cancel
from core.models import ACTIVE_STATUSES, Job, Search, SearchJob, utcnow
from core.search import SearchBudget, summarise, trial_row

log = logging.getLogger(__name__)

OPEN_STATUSES = ("running", "cancelling")


def search_jobs(session: Session, search_id: str) -> list[Job]:
    """The search's child jobs, oldest first."""
    query = (
        select(Job)
        .join(SearchJob, SearchJob.job_id == Job.id)
        .where(SearchJob.search_id == search_id)
        .order_by(Job.id)
    )
    return list(session.scalars(query))


def search_of_job(session: Session, job_id: str) -> str | None:
    return session.scalar(select(SearchJob.search_id).where(SearchJob.job_id == job_id))


def search_result(search: Search, jobs: list[Job]) -> dict[str, Any]:
    """The result of a search whose children have all ended."""
    budget = SearchBudget.model_validate(search.request.get("budget") or {})
    trials = [trial_row(j.id, j.status, j.spec, j.result, j.error) for j in jobs]
    return summarise(trials, budget, list(search.plan.get("skipped") or []))


def settle_search(session: Session, search_id: str) -> str | None:
    """Write the result of a search whose children have all ended; its new status, or None
    when it is settled already or a child is still active."""
    search = session.get(Search, search_id, populate_existing=True)
    if search is None or search.status not in OPEN_STATUSES:
        session.rollback()
        return None
    jobs = search_jobs(session, search_id)
    if any(j.status in ACTIVE_STATUSES for j in jobs):
        session.rollback()
        return None
    result = search_result(search, jobs)
    error = None
    if search.cancel_requested:
        status = "cancelled"
    elif any(j.status == "succeeded" for j in jobs):
        status = "succeeded"
    else:
        status = "failed"
        codes = sorted({(j.error or {}).get("code", "unknown") for j in jobs})
        error = {
            "code": "all_trials_failed",
            "message": f"every trial of this search failed ({', '.join(codes)}); see each job's "
            "error",
        }
    won = session.execute(
        update(Search)
        .where(Search.id == search_id, Search.status.in_(OPEN_STATUSES))
        .values(status=status, result=result, error=error, finished_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    if won.rowcount != 1:
        session.rollback()
        return None
    session.commit()
    log.info("search %s %s (best: %s)", search_id, status, result.get("best_job_id"))
    return status


def settle_finished_searches(session: Session) -> int:
    """Settle every open search none of whose children is active (the reconciler's pass)."""
    active_child = exists(
        select(SearchJob.job_id)
        .join(Job, Job.id == SearchJob.job_id)
        .where(SearchJob.search_id == Search.id, Job.status.in_(ACTIVE_STATUSES))
    )
    ready = list(
        session.scalars(select(Search.id).where(Search.status.in_(OPEN_STATUSES), ~active_child))
    )
    session.rollback()
    return sum(1 for search_id in ready if settle_search(session, search_id) is not None)


def cancel_search(session: Session, search: Search) -> None:
    """Cancel a search and each of its active children (idempotent); settled at once when no
    child is still running."""
    session.execute(
        update(Search)
        .where(Search.id == search.id, Search.status == "running")
        .values(status="cancelling", cancel_requested=True)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    for job in search_jobs(session, search.id):
        if job.status in ACTIVE_STATUSES:
            request_cancel(session, job)
    settle_search(session, search.id)
