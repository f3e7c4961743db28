"""Job state in the database: events now; claims, leases and transitions live here too."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.models import JobEvent, utcnow


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
