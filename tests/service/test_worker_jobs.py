"""Job leases and transitions (core/jobs.py) and the reconciler, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core.config import Settings
from core.db import session_factory
from core.jobs import (
    claim_job,
    fail_job,
    finish_job,
    heartbeat,
    mark_cancelled,
    request_cancel,
)
from core.models import Job, JobEvent, new_id, utcnow
from tests.service.helpers import fresh_postgres, make_tenant, migrate
from worker.reconciler import reconcile

pytestmark = pytest.mark.service


@pytest.fixture(params=["sqlite", "postgres"])
def sessions(request: pytest.FixtureRequest, tmp_path) -> Iterator[sessionmaker[Session]]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'jobs.db'}"
        migrate(url)
        yield session_factory(url)
        return
    base = request.getfixturevalue("postgres_url")
    with fresh_postgres(base) as url:
        migrate(url)
        yield session_factory(url)


def _job(sessions: sessionmaker[Session], **values) -> str:
    with sessions() as s:
        tenant = make_tenant(s)
        job = Job(
            id=new_id("job"),
            tenant_id=tenant.id,
            spec={"teacher": {"model_id": "mdl_x"}, "dataset_id": "ds_x"},
            enqueued_at=utcnow(),
            **values,
        )
        s.add(job)
        s.commit()
        return job.id


def _status_events(sessions: sessionmaker[Session], job_id: str) -> list[dict]:
    with sessions() as s:
        return [
            e.data
            for e in s.scalars(
                select(JobEvent)
                .where(JobEvent.job_id == job_id, JobEvent.type == "status")
                .order_by(JobEvent.seq)
            )
        ]


def _get(sessions: sessionmaker[Session], job_id: str) -> Job:
    with sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def _settings(**kw) -> Settings:
    return Settings(lease_seconds=30, requeue_after_seconds=30, max_attempts=2, **kw)


def test_claim_is_exclusive_under_a_race(sessions: sessionmaker[Session]) -> None:
    job_id = _job(sessions)
    barrier = threading.Barrier(4)
    winners: list[str] = []

    def contend(owner: str) -> None:
        with sessions() as s:
            barrier.wait()
            if claim_job(s, job_id, owner, lease_seconds=30) is not None:
                winners.append(owner)

    threads = [threading.Thread(target=contend, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1
    job = _get(sessions, job_id)
    assert (job.status, job.attempt, job.lease_owner) == ("running", 1, winners[0])
    assert job.started_at is not None and job.heartbeat_at is not None
    assert _status_events(sessions, job_id) == [
        {"status": "running", "attempt": 1, "worker": winners[0]}
    ]


def test_second_delivery_does_nothing(sessions: sessionmaker[Session]) -> None:
    job_id = _job(sessions)
    with sessions() as s:
        assert claim_job(s, job_id, "first", lease_seconds=30) is not None
        assert claim_job(s, job_id, "second", lease_seconds=30) is None
    job = _get(sessions, job_id)
    assert (job.lease_owner, job.attempt) == ("first", 1)
    assert len(_status_events(sessions, job_id)) == 1


def test_heartbeat_renews_and_reports_a_lost_lease(sessions: sessionmaker[Session]) -> None:
    job_id = _job(sessions)
    with sessions() as s:
        claim_job(s, job_id, "w1", lease_seconds=30, now=utcnow() - timedelta(seconds=20))
        before = _get(sessions, job_id).heartbeat_at
        assert heartbeat(s, job_id, "w1", lease_seconds=30)
        assert _get(sessions, job_id).heartbeat_at > before
        assert not heartbeat(s, job_id, "someone-else", lease_seconds=30)
    # The reconciler gave the job to another worker: the first one's heartbeat now fails.
    with sessions() as s:
        s.get(Job, job_id).lease_owner = "w2"
        s.commit()
        assert not heartbeat(s, job_id, "w1", lease_seconds=30)
        assert heartbeat(s, job_id, "w2", lease_seconds=30)


def test_cancel_queued_running_and_terminal(sessions: sessionmaker[Session]) -> None:
    queued = _job(sessions)
    with sessions() as s:
        job = request_cancel(s, s.get(Job, queued))
        assert job.status == "cancelled" and job.finished_at is not None
        assert request_cancel(s, job).status == "cancelled"  # idempotent
    assert [e["status"] for e in _status_events(sessions, queued)] == ["cancelled"]

    running = _job(sessions)
    with sessions() as s:
        claim_job(s, running, "w1", lease_seconds=30)
        job = request_cancel(s, s.get(Job, running))
        assert (job.status, job.cancel_requested) == ("cancelling", True)
        request_cancel(s, job)
        # The runner's heartbeat tells it to stop; it then records the cancellation.
        assert not heartbeat(s, running, "w1", lease_seconds=30)
        assert mark_cancelled(s, running, owner="w1")
        assert not finish_job(s, running, "w1", {"student": {}}, [])
    assert _get(sessions, running).status == "cancelled"
    statuses = [e["status"] for e in _status_events(sessions, running)]
    assert statuses == ["running", "cancelling", "cancelled"]


def test_finish_needs_the_lease(sessions: sessionmaker[Session]) -> None:
    job_id = _job(sessions)
    with sessions() as s:
        claim_job(s, job_id, "w1", lease_seconds=30)
        assert not finish_job(s, job_id, "w2", {"x": 1}, [])
        assert not fail_job(s, job_id, {"code": "internal", "message": "m"}, owner="w2")
        assert finish_job(s, job_id, "w1", {"x": 1}, [])
        assert not fail_job(s, job_id, {"code": "internal", "message": "m"})
    job = _get(sessions, job_id)
    assert (job.status, job.result, job.error) == ("succeeded", {"x": 1}, None)


def test_reconciler_requeues_a_stale_job_then_fails_it(sessions: sessionmaker[Session]) -> None:
    settings = _settings()
    job_id = _job(sessions, queue="gpu")
    sent: list[tuple[str, str]] = []
    send = lambda job_id, queue: sent.append((job_id, queue))  # noqa: E731
    start = utcnow()
    with sessions() as s:
        claim_job(s, job_id, "w1", lease_seconds=30, now=start)
    # A live heartbeat is left alone.
    counts = reconcile(sessions, settings, now=start + timedelta(seconds=10), send=send)
    assert counts["requeued"] == 0 and _get(sessions, job_id).status == "running"

    counts = reconcile(sessions, settings, now=start + timedelta(seconds=31), send=send)
    assert counts["requeued"] == 1 and sent == [(job_id, "gpu")]
    job = _get(sessions, job_id)
    assert (job.status, job.lease_owner, job.attempt) == ("queued", None, 1)
    last = _status_events(sessions, job_id)[-1]
    assert last["status"] == "queued" and last["reason"] == "worker_lost"
    assert last["last_heartbeat"].startswith(start.isoformat()[:19])

    # The second attempt is claimed, its worker dies too: attempts are used up.
    later = start + timedelta(seconds=40)
    with sessions() as s:
        assert claim_job(s, job_id, "w2", lease_seconds=30, now=later).attempt == 2
    counts = reconcile(sessions, settings, now=later + timedelta(seconds=31), send=send)
    assert counts["failed"] == 1 and len(sent) == 1
    job = _get(sessions, job_id)
    assert job.status == "failed" and job.error["code"] == "worker_lost"
    assert job.finished_at is not None
    # A second pass changes nothing.
    assert reconcile(sessions, settings, now=later + timedelta(seconds=60), send=send) == {
        "resent": 0,
        "requeued": 0,
        "failed": 0,
        "cancelled": 0,
        "searches": 0,
    }


def test_reconciler_cancels_a_stale_cancelling_job(sessions: sessionmaker[Session]) -> None:
    job_id = _job(sessions)
    start = utcnow()
    with sessions() as s:
        claim_job(s, job_id, "w1", lease_seconds=30, now=start)
        request_cancel(s, s.get(Job, job_id))
    counts = reconcile(
        sessions, _settings(), now=start + timedelta(seconds=31), send=lambda *a: None
    )
    assert counts["cancelled"] == 1
    assert _get(sessions, job_id).status == "cancelled"


def test_reconciler_resends_a_lost_queued_message(sessions: sessionmaker[Session]) -> None:
    settings = _settings()
    old = _job(sessions)
    never_sent = _job(sessions)
    with sessions() as s:
        s.get(Job, never_sent).enqueued_at = None
        s.commit()
    sent: list[str] = []
    send = lambda job_id, queue: sent.append(job_id)  # noqa: E731
    now = utcnow()
    assert reconcile(sessions, settings, now=now, send=send)["resent"] == 0
    counts = reconcile(sessions, settings, now=now + timedelta(seconds=31), send=send)
    assert counts["resent"] == 2 and sorted(sent) == sorted([old, never_sent])
    # The re-send was recorded: the next pass does not send them again.
    assert reconcile(sessions, settings, now=now + timedelta(seconds=35), send=send)["resent"] == 0
    assert _get(sessions, old).enqueued_at is not None
