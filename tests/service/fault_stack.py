"""A real service for fault tests: PostgreSQL, Redis, the API, workers and the reconciler.

Every part is a real process (uvicorn, ``celery worker``, ``celery worker --beat``) started with
short leases, so a killed worker is noticed in seconds. Tests kill the processes by pid, wipe
the Redis database and read the outcome from the database and the storage folder.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import redis
import torch
from sqlalchemy import select
from torch import nn

from cli.digits import DigitsCNN, train_classifier
from core.db import session_factory
from core.models import Artifact, Job, JobEvent
from tests.core.model_files import save_torchscript
from tests.service.helpers import Proc, service_env, start_api
from worker.celery_app import celery_command, control_argv, worker_argv

# Leases of seconds instead of minutes: a dead worker is stale after 3 s.
FAST_SETTINGS = {
    "heartbeat_seconds": "0.5",
    "lease_seconds": "3",
    "reconcile_seconds": "1",
    "requeue_after_seconds": "2",
    "max_attempts": "3",
}
TERMINAL = {"succeeded", "failed", "cancelled"}


class HangOnLargeBatches(nn.Module):
    """A teacher that answers small batches (so it uploads) and spins forever on large ones."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 16:
            for _ in range(1_000_000_000_000):
                x = x * 1.0
        return self.net(x)


class Stack:
    """The processes of one service and ways to look at its state."""

    def __init__(self, tmp: Path, database_url: str, broker_url: str) -> None:
        self.tmp = tmp
        self.blobs = tmp / "blobs"
        self.settings = {
            "data_dir": str(tmp / "data"),
            "storage_url": f"file://{self.blobs}",
            "database_url": database_url,
            "broker_url": broker_url,
            "auth": "off",
            "max_active_jobs_per_tenant": str(10**6),  # bench/soak.py queues many at once
            **FAST_SETTINGS,
        }
        self.redis = redis.Redis.from_url(broker_url)
        self.sessions = session_factory(database_url)
        self.procs: list[Proc] = []
        self.workers: list[Proc] = []
        self.api: Proc | None = None
        self.beat: Proc | None = None
        self.http = httpx.Client(timeout=60)
        self._count = 0

    # --- processes -----------------------------------------------------------------------------

    def env(self, **extra: str) -> dict[str, str]:
        env = service_env(**{**self.settings, **extra})
        # One thread per job process: tiny batches run several times slower with two threads
        # on a busy two-core machine.
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        return env

    def start_api(self) -> None:
        self.api, base = start_api(self.env(), self.tmp)
        self.procs.append(self.api)
        self.http.base_url = httpx.URL(base)

    def start_beat(self) -> None:
        self.beat = self._start("beat", celery_command(control_argv()), self.env())

    def start_worker(self, **extra: str) -> Proc:
        """A job worker (one slot); ``extra`` adds DISTILL_* settings for it alone."""
        proc = self._start("worker", celery_command(worker_argv(["cpu"], 1)), self.env(**extra))
        self.workers.append(proc)
        return proc

    def stop_workers(self) -> None:
        """Stop every worker (and its job process) so the next test starts with none."""
        for proc in self.workers:
            proc.stop(timeout=5)
            self.procs.remove(proc)
        self.workers.clear()

    def _start(self, kind: str, argv: list[str], env: dict[str, str]) -> Proc:
        self._count += 1
        proc = Proc(f"{kind}-{self._count}", argv, env, self.tmp)
        self.procs.append(proc)
        proc.wait_for_output("ready.", timeout=90)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop(timeout=5)
        self.procs.clear()
        self.http.close()

    def log_tail(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.output()[-2500:]}" for p in self.procs if p.log_path.exists()
        )

    # --- jobs ----------------------------------------------------------------------------------

    def upload(self, route: str, path: Path, **fields: str) -> str:
        with path.open("rb") as f:
            r = self.http.post(route, files={"file": (path.name, f)}, data=fields)
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def submit(self, spec: dict[str, Any]) -> str:
        r = self.http.post("/v1/jobs", json=spec)
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def job(self, job_id: str) -> Job:
        with self.sessions() as s:
            job = s.get(Job, job_id)
            assert job is not None
            return job

    def wait(self, job_id: str, statuses: set[str], timeout: float) -> Job:
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job.status in statuses:
                return job
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{job_id} is {job.status} (attempt {job.attempt}) after {timeout}s\n"
                    + self.log_tail()
                )
            time.sleep(0.1)

    def wait_until(self, what: str, check: Any, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"waited {timeout}s for {what}\n" + self.log_tail())
            time.sleep(0.1)

    def events(self, job_id: str, type: str | None = None) -> list[dict[str, Any]]:
        query = select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)
        if type is not None:
            query = query.where(JobEvent.type == type)
        with self.sessions() as s:
            return [{"type": e.type, **e.data} for e in s.scalars(query)]

    def artifacts(self, job_id: str) -> list[Artifact]:
        with self.sessions() as s:
            return list(s.scalars(select(Artifact).where(Artifact.job_id == job_id)))

    def blobs_under(self, prefix: str) -> list[Path]:
        root = self.blobs / prefix
        return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []

    def has_checkpoint(self, job_id: str) -> bool:
        return (self.blobs / "jobs" / job_id / "checkpoints" / "manifest.json").exists()


def job_children(worker: Proc) -> list[psutil.Process]:
    """The job processes of a worker: the interpreters running ``python -m worker.child`` (inside
    their cage, not the bubblewrap processes around them)."""
    try:
        children = psutil.Process(worker.popen.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for child in children:
        try:
            if child.cmdline()[1:3] == ["-m", "worker.child"]:
                found.append(child)
        except psutil.Error:
            continue
    return found


def kill_group(proc: Proc) -> None:
    """SIGKILL a process's whole group (a worker and its job process) and reap it."""
    os.killpg(proc.popen.pid, signal.SIGKILL)
    proc.popen.wait(10)


def write_inputs(folder: Path) -> dict[str, Path]:
    """A tiny trained TorchScript teacher, a hanging one, and the digits as an .npz."""
    from cli.digits import digits_arrays, write_digits_npz

    folder.mkdir(parents=True, exist_ok=True)
    x, y = digits_arrays()
    torch.manual_seed(0)
    teacher = train_classifier(DigitsCNN(width=4), x, y, epochs=2)
    return {
        "teacher": save_torchscript(teacher, folder / "teacher.pt"),
        "hang": save_torchscript(HangOnLargeBatches(), folder / "hang.pt"),
        "digits": write_digits_npz(folder / "digits.npz"),
    }


def job_spec(
    teacher: str, dataset: str, *, epochs: int = 1, batch_size: int = 64, **training: Any
) -> dict[str, Any]:
    """A small job: an MLP student, no baseline, safetensors only."""
    student = training.pop("student", {"preset": "mlp", "width": 16, "depth": 1})
    return {
        "teacher": {"model_id": teacher},
        "dataset_id": dataset,
        "student": student,
        "training": {
            "epochs": epochs,
            "batch_size": batch_size,
            "baseline": False,
            "early_stopping_patience": None,
            **training,
        },
        "export": ["safetensors"],
    }
