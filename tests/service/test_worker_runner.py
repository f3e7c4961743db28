"""The runner with a real spawned child (a stand-in engine), real SQLite and local storage."""

from __future__ import annotations

import hashlib
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from core.config import Settings
from core.db import session_factory
from core.jobs import claim_job, request_cancel
from core.models import Artifact, Dataset, Job, JobEvent, Model, new_id, utcnow
from core.storage import get_storage
from tests.service.helpers import make_tenant, migrate
from worker.checkpoints import checkpoint_prefix
from worker.reconciler import reconcile
from worker.runner import RunEnd, run_claimed_job

pytestmark = pytest.mark.service
FAKE_ENGINE = "tests.service.fake_engine:run_job"


class Env:
    def __init__(self, tmp: Path) -> None:
        self.settings = Settings(
            data_dir=tmp / "data",
            database_url=f"sqlite:///{tmp / 'distill.db'}",
            storage_url=f"file://{tmp / 'blobs'}",
            heartbeat_seconds=0.5,
            lease_seconds=30,
            max_attempts=3,
        )
        migrate(self.settings.database)
        self.sessions = session_factory(self.settings.database)
        self.storage = get_storage(self.settings.storage)
        self.tmp = tmp

    def submit(self, mode: str, max_minutes: float = 60) -> str:
        """A queued job with a stored teacher and dataset, whose fake engine acts as ``mode``."""
        blob = self.tmp / "blob.bin"
        blob.write_bytes(b"not really a model")
        with self.sessions() as s:
            tenant = make_tenant(s)
            model = Model(
                id=new_id("mdl"),
                tenant_id=tenant.id,
                name="t",
                format="onnx",
                size_bytes=18,
                sha256="0" * 64,
                signature={"inputs": [], "outputs": []},
                storage_key=f"models/{tenant.id}/teacher.onnx",
            )
            dataset = Dataset(
                id=new_id("ds"),
                tenant_id=tenant.id,
                name="d",
                format="npz",
                n_samples=10,
                x_shape=[None, 4],
                x_dtype="float32",
                has_labels=False,
                size_bytes=18,
                sha256="0" * 64,
                storage_key=f"datasets/{tenant.id}/d.npz",
            )
            for row in (model, dataset):
                self.storage.put_file(row.storage_key, blob)
            job = Job(
                id=new_id("job"),
                tenant_id=tenant.id,
                spec={
                    "name": mode,
                    "teacher": {"model_id": model.id},
                    "dataset_id": dataset.id,
                    "training": {"max_minutes": max_minutes},
                },
            )
            s.add_all([model, dataset, job])
            s.commit()
            return job.id

    def claim_and_run(self, job_id: str, owner: str = "w1") -> RunEnd:
        with self.sessions() as s:
            assert claim_job(s, job_id, owner, self.settings.lease_seconds) is not None
        return run_claimed_job(
            job_id,
            owner,
            settings=self.settings,
            session_factory=self.sessions,
            storage=self.storage,
            engine=FAKE_ENGINE,
        )

    def job(self, job_id: str) -> Job:
        with self.sessions() as s:
            return s.get(Job, job_id)

    def events(self, job_id: str, type: str) -> list[dict[str, Any]]:
        with self.sessions() as s:
            rows = s.scalars(
                select(JobEvent)
                .where(JobEvent.job_id == job_id, JobEvent.type == type)
                .order_by(JobEvent.seq)
            )
            return [e.data for e in rows]

    def artifacts(self, job_id: str) -> list[Artifact]:
        with self.sessions() as s:
            return list(s.scalars(select(Artifact).where(Artifact.job_id == job_id)))

    def blobs_under(self, prefix: str) -> list[Path]:
        root = self.tmp / "blobs" / prefix
        return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def test_success_records_events_artifacts_and_cleans_up(env: Env) -> None:
    job_id = env.submit("ok")
    assert env.claim_and_run(job_id) == RunEnd.SUCCEEDED
    job = env.job(job_id)
    assert job.status == "succeeded" and job.finished_at is not None
    assert job.result["student"] == {"accuracy": 0.5}
    assert job.result["inputs"] == [job.spec["teacher"]["model_id"]]
    assert [m["epoch"] for m in env.events(job_id, "metrics")] == [1, 2, 3]
    assert job.metrics == {"epoch": 3, "train_loss": pytest.approx(1 / 3)}
    assert job.progress["epoch"] == 3
    assert env.events(job_id, "log") == [{"message": "done"}]
    assert [e["status"] for e in env.events(job_id, "status")] == ["running", "succeeded"]
    arts = {a.name: a for a in env.artifacts(job_id)}
    assert set(arts) == {"student.bin", "report.json"}
    student = arts["student.bin"]
    assert student.storage_key == f"jobs/{job_id}/attempt-1/student.bin"
    with env.storage.local_copy(student.storage_key) as path:
        data = Path(path).read_bytes()
    assert data == b"student weights" and student.sha256 == hashlib.sha256(data).hexdigest()
    # Terminal: checkpoints leave storage and the work folder is gone.
    assert env.blobs_under(checkpoint_prefix(job_id)) == []
    assert not (env.settings.data_dir / "work" / job_id).exists()


def _run_in_thread(env: Env, job_id: str) -> tuple[threading.Thread, list[RunEnd]]:
    """Claim and run the job in a thread; return once its engine has reported epoch 3."""
    outcome: list[RunEnd] = []
    runner = threading.Thread(target=lambda: outcome.append(env.claim_and_run(job_id)))
    runner.start()
    deadline = time.monotonic() + 60
    while env.job(job_id).metrics.get("epoch") != 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    return runner, outcome


def test_cancel_stops_a_running_job_within_seconds_without_artifacts(env: Env) -> None:
    job_id = env.submit("slow")
    runner, outcome = _run_in_thread(env, job_id)
    with env.sessions() as s:
        assert request_cancel(s, s.get(Job, job_id)).status == "cancelling"
    asked = time.monotonic()
    while env.job(job_id).status != "cancelled" and time.monotonic() - asked < 10:
        time.sleep(0.05)
    took = time.monotonic() - asked
    runner.join(10)
    assert env.job(job_id).status == "cancelled" and took < 5, took
    assert outcome == [RunEnd.CANCELLED]
    assert env.artifacts(job_id) == [] and env.blobs_under(f"jobs/{job_id}/attempt-1") == []
    assert env.blobs_under(checkpoint_prefix(job_id)) == []


def test_a_job_another_worker_holds_is_stopped_and_left_as_it_is(env: Env) -> None:
    job_id = env.submit("slow")
    runner, outcome = _run_in_thread(env, job_id)
    with env.sessions() as s:  # the lease expired and another worker claimed the job
        s.get(Job, job_id).lease_owner = "w2"
        s.commit()
    runner.join(30)
    assert outcome == [RunEnd.TAKEN_OVER]
    job = env.job(job_id)
    assert (job.status, job.lease_owner, job.error) == ("running", "w2", None)
    assert env.artifacts(job_id) == []


def test_a_hung_engine_is_killed_at_max_minutes(env: Env) -> None:
    job_id = env.submit("hang", max_minutes=0.02)
    started = time.monotonic()
    assert env.claim_and_run(job_id) == RunEnd.FAILED
    assert time.monotonic() - started < 20
    job = env.job(job_id)
    assert job.error["code"] == "timeout" and "max_minutes" in job.error["message"]
    assert env.artifacts(job_id) == []


def test_an_engine_error_becomes_the_jobs_error(env: Env) -> None:
    job_id = env.submit("diverge")
    assert env.claim_and_run(job_id) == RunEnd.FAILED
    job = env.job(job_id)
    assert job.error == {
        "code": "training_diverged",
        "message": "the loss became NaN at epoch 3; lower lr",
    }
    assert env.events(job_id, "status")[-1]["error"]["code"] == "training_diverged"


def test_a_killed_job_is_retried_by_the_reconciler_and_resumes(env: Env) -> None:
    job_id = env.submit("crash-once")
    assert env.claim_and_run(job_id) == RunEnd.LEFT_TO_RECONCILER
    assert env.job(job_id).status == "running"  # the reconciler's to settle
    assert env.blobs_under(checkpoint_prefix(job_id)) != []
    sent: list[str] = []
    later = utcnow() + timedelta(seconds=env.settings.lease_seconds + 1)
    counts = reconcile(
        env.sessions, env.settings, now=later, send=lambda j, q: sent.append(j), storage=env.storage
    )
    assert counts["requeued"] == 1 and sent == [job_id]
    # Another worker takes the re-sent job and resumes from the uploaded checkpoint.
    assert env.claim_and_run(job_id, owner="w2") == RunEnd.SUCCEEDED
    job = env.job(job_id)
    assert job.attempt == 2 and job.result["resumed_from"] == "epoch 1"
    assert {a.storage_key.split("/")[2] for a in env.artifacts(job_id)} == {"attempt-2"}
