"""A real `distill worker` and `distill beat` on each broker: delivery, claim, reconciliation."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis

from core.config import Settings
from core.db import session_factory
from core.models import Job, JobEvent, new_id
from tests.service.helpers import (
    Proc,
    fresh_postgres,
    make_tenant,
    migrate,
    service_env,
    start_worker,
)
from worker.celery_app import celery_command, control_argv, make_celery
from worker.dispatch import JobSender

pytestmark = pytest.mark.service
REDIS_DB = 11  # this module's own Redis database, flushed before and after


@pytest.fixture(params=["embedded", "postgres-redis"])
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, str]]:
    """DISTILL_* settings for one stack, with an empty database (and Redis db)."""
    base = {"data_dir": str(tmp_path / "data"), "storage_url": f"file://{tmp_path / 'blobs'}"}
    if request.param == "embedded":
        base["database_url"] = f"sqlite:///{tmp_path / 'distill.db'}"
        migrate(base["database_url"])
        yield base
        return
    pg = request.getfixturevalue("postgres_url")
    redis_base = request.getfixturevalue("redis_url").rsplit("/", 1)[0]
    broker = f"{redis_base}/{REDIS_DB}"
    client = redis.Redis.from_url(broker)
    client.flushdb()
    with fresh_postgres(pg) as url:
        migrate(url)
        yield {**base, "database_url": url, "broker_url": broker}
    client.flushdb()


def _settings(stack: dict[str, str]) -> Settings:
    return Settings(**stack)


def _orphan_job(stack: dict[str, str]) -> str:
    """A queued job whose teacher does not exist: the worker claims it and fails it clearly."""
    sessions = session_factory(stack["database_url"])
    with sessions() as s:
        tenant = make_tenant(s)
        job = Job(
            id=new_id("job"),
            tenant_id=tenant.id,
            spec={"teacher": {"model_id": "mdl_gone"}, "dataset_id": "ds_gone"},
        )
        s.add(job)
        s.commit()
        return job.id


def _wait_status(stack: dict[str, str], job_id: str, status: str, timeout: float) -> Job:
    sessions = session_factory(stack["database_url"])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with sessions() as s:
            job = s.get(Job, job_id)
            if job.status == status:
                return job
        time.sleep(0.1)
    raise AssertionError(f"{job_id} is {job.status}, not {status}, after {timeout}s")


def test_worker_claims_a_sent_job_and_records_its_failure(
    stack: dict[str, str], tmp_path: Path
) -> None:
    worker = start_worker(service_env(**stack), tmp_path)
    try:
        job_id = _orphan_job(stack)
        sessions = session_factory(stack["database_url"])
        sent = time.monotonic()
        sender = JobSender(make_celery(_settings(stack)))  # what the API sends jobs with
        with sessions() as s:
            sender.submit(s.get(Job, job_id))
        sender.close()
        job = _wait_status(stack, job_id, "failed", timeout=30)
        took = time.monotonic() - sent
        assert job.error["code"] == "invalid_spec" and "mdl_gone" in job.error["message"]
        assert job.attempt == 1 and job.lease_owner is None
        with sessions() as s:
            statuses = [
                e.data["status"] for e in s.query(JobEvent).filter_by(job_id=job_id, type="status")
            ]
        assert statuses == ["running", "failed"]
        assert took < 10, f"the round trip took {took:.1f}s"
    finally:
        worker.stop()


def test_a_burst_of_jobs_reaches_the_broker_whole_and_in_order(stack: dict[str, str]) -> None:
    app = make_celery(_settings(stack))
    sender = JobSender(app)
    ids = [f"job_{i:04d}" for i in range(1000)]  # sent in batches of what is pending
    for job_id in ids:
        sender.submit(SimpleNamespace(id=job_id, queue="cpu"))
    sender.close()
    taken, task_ids = [], set()
    with app.connection_for_read() as conn:
        while (message := conn.default_channel.basic_get("cpu", no_ack=True)) is not None:
            assert message.headers["task"] == "distill.run_job"
            assert message.decode()[0] == [message.headers["argsrepr"][2:-2]]  # the job id
            taken.append(message.headers["argsrepr"])
            task_ids.add(message.headers["id"])
    assert taken == [repr([job_id]) for job_id in ids]
    assert len(task_ids) == len(ids)  # every message its own task id


def test_beat_resends_a_job_whose_message_was_lost(stack: dict[str, str], tmp_path: Path) -> None:
    fast = {**stack, "reconcile_seconds": "0.5", "requeue_after_seconds": "1"}
    job_id = _orphan_job(stack)  # in the database, never sent: as if the broker lost it
    env = service_env(**fast)
    worker = start_worker(env, tmp_path)
    beat = Proc("beat", celery_command(control_argv()), env, tmp_path)
    try:
        job = _wait_status(stack, job_id, "failed", timeout=45)
        assert job.error["code"] == "invalid_spec"
    finally:
        beat.stop()
        worker.stop()
