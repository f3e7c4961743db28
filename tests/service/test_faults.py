"""Faults on a real service (PostgreSQL, Redis, uvicorn, Celery workers, the reconciler).

Workers and job processes are SIGKILLed by pid, the Redis database is wiped with FLUSHDB, the API
is restarted, messages are sent twice, jobs run out of time and memory. Each test reads the
outcome where the truth lives: the jobs, events and artifacts tables and the storage folder.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

from core.config import Settings
from tests.conftest import POSTGRES_URL, REDIS_URL, require_service
from tests.core.causal_files import corpus, train_teacher, write_text_jsonl, zip_folder
from tests.service.fault_stack import (
    FAST_SETTINGS,
    TERMINAL,
    Stack,
    job_children,
    job_spec,
    kill_group,
    write_inputs,
)
from tests.service.helpers import Proc, fresh_postgres, migrate
from worker.celery_app import RUN_JOB_TASK, make_celery

pytestmark = [pytest.mark.service, pytest.mark.slow]
REDIS_DB = 9  # this module's own Redis database, flushed before and after
LEASE = float(FAST_SETTINGS["lease_seconds"])
RESUMED = re.compile(r"resumed from \S+ after epoch (\d+)")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """API and reconciler on a fresh PostgreSQL database and Redis db; workers are per test."""
    require_service("PostgreSQL", "127.0.0.1", 5432)
    require_service("Redis", "127.0.0.1", 6379)
    tmp = tmp_path_factory.mktemp("faults")
    broker = REDIS_URL.rsplit("/", 1)[0] + f"/{REDIS_DB}"
    with fresh_postgres(POSTGRES_URL) as url:
        migrate(url)
        stack = Stack(tmp, url, broker)
        stack.redis.flushdb()
        try:
            stack.start_api()
            stack.start_beat()
            yield stack
        finally:
            stack.stop_all()
            stack.redis.flushdb()


@pytest.fixture(scope="module")
def inputs(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    files = write_inputs(tmp_path_factory.mktemp("inputs"))
    return {
        "teacher": stack.upload("/v1/models", files["teacher"], input_shape="[1, 8, 8]"),
        "hang": stack.upload("/v1/models", files["hang"], input_shape="[1, 8, 8]"),
        "digits": stack.upload("/v1/datasets", files["digits"]),
    }


@pytest.fixture(autouse=True)
def _no_workers_left(stack: Stack) -> Iterator[None]:
    yield
    stack.stop_workers()


def _slow_spec(inputs: dict[str, str], epochs: int) -> dict[str, Any]:
    """About a second per epoch on a busy machine: batches of 8."""
    return job_spec(inputs["teacher"], inputs["digits"], epochs=epochs, batch_size=8)


def _statuses(stack: Stack, job_id: str) -> list[dict[str, Any]]:
    return stack.events(job_id, "status")


def _after_last_running(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    starts = [i for i, e in enumerate(events) if e["type"] == "status" and e["status"] == "running"]
    return events[starts[-1] :]


def _assert_resumed_once(stack: Stack, job_id: str, epochs: int, measure: str = "accuracy") -> None:
    """Finished once, by attempt 2, from the last uploaded checkpoint, with one artifact set."""
    job = stack.job(job_id)
    assert (job.status, job.attempt) == ("succeeded", 2), (job.status, job.error)
    statuses = [(e["status"], e.get("attempt")) for e in _statuses(stack, job_id)]
    assert statuses == [
        ("queued", None),  # written by the API
        ("running", 1),
        ("queued", 1),  # the reconciler: heartbeat stale
        ("running", 2),
        ("succeeded", 2),
    ], statuses
    requeued = [e for e in _statuses(stack, job_id) if e["status"] == "queued" and "reason" in e]
    assert len(requeued) == 1 and requeued[0]["reason"] == "worker_lost"
    assert "stopped sending heartbeats" in requeued[0]["message"]

    second = _after_last_running(stack.events(job_id))
    logs = [RESUMED.search(e.get("message", "")) for e in second if e["type"] == "log"]
    resumed = [int(m.group(1)) for m in logs if m]
    assert len(resumed) == 1 and resumed[0] >= 1, [e for e in second if e["type"] == "log"]
    done_before = resumed[0]
    # Epochs up to the checkpoint are not trained again; the rest once each.
    metrics = [e["epoch"] for e in second if e["type"] == "metrics" and "epoch" in e]
    assert metrics == list(range(done_before + 1, epochs + 1)), (done_before, metrics)
    assert job.result["student"][measure] > 0
    artifacts = stack.artifacts(job_id)
    assert sorted(a.name for a in artifacts) == sorted({a.name for a in artifacts})
    assert {a.attempt for a in artifacts} == {2}
    assert all("/attempt-2/" in a.storage_key for a in artifacts)
    assert stack.blobs_under(f"jobs/{job_id}/attempt-1") == []
    assert stack.blobs_under(f"jobs/{job_id}/checkpoints") == []  # removed once terminal


def _mid_job(stack: Stack, worker: Proc, job_id: str, epoch: int) -> list[psutil.Process]:
    """The job process, once the job has passed ``epoch`` and uploaded a checkpoint."""
    metrics = stack.events(job_id, "metrics")
    if not metrics or metrics[-1]["epoch"] < epoch or not stack.has_checkpoint(job_id):
        return []
    assert stack.job(job_id).status == "running", "the job finished before it could be killed"
    return job_children(worker)


# --- 1. worker loss ----------------------------------------------------------------------------


def test_a_killed_worker_is_replaced_and_the_job_resumes_from_its_checkpoint(
    stack: Stack, inputs: dict[str, str]
) -> None:
    epochs = 12
    first = stack.start_worker()
    job_id = stack.submit(_slow_spec(inputs, epochs))
    children = stack.wait_until(
        "epoch 2 and a checkpoint", lambda: _mid_job(stack, first, job_id, 2), 120
    )
    assert len(children) == 1
    kill_group(first)  # the worker and its job process, no chance to say goodbye
    killed = time.monotonic()
    _, alive = psutil.wait_procs(children, timeout=10)
    assert alive == []  # the job process died with its worker
    assert stack.job(job_id).status == "running"  # nobody knows yet

    stack.start_worker()
    stack.wait_until("the re-queue", lambda: stack.job(job_id).attempt == 2, 30)
    noticed = time.monotonic() - killed
    assert noticed < LEASE + 10, noticed
    stack.wait(job_id, TERMINAL, timeout=120)
    _assert_resumed_once(stack, job_id, epochs)


def test_a_killed_job_process_is_retried_by_the_same_worker(
    stack: Stack, inputs: dict[str, str]
) -> None:
    epochs = 12
    worker = stack.start_worker()
    job_id = stack.submit(_slow_spec(inputs, epochs))
    (child,) = stack.wait_until(
        "epoch 2 and a checkpoint", lambda: _mid_job(stack, worker, job_id, 2), 120
    )
    child.kill()
    stack.wait(job_id, TERMINAL, timeout=120)
    assert worker.popen.poll() is None  # the worker survived its job process
    _assert_resumed_once(stack, job_id, epochs)
    owners = [e["worker"] for e in _statuses(stack, job_id) if e["status"] == "running"]
    assert len(owners) == 2 and all(f":{worker.popen.pid}:" in o for o in owners)


def test_a_killed_causal_job_process_resumes_from_its_checkpoint(
    stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A causal-LM job: the checkpoint of its student after epoch 2 survives its process."""
    tmp = tmp_path_factory.mktemp("causal")
    texts = corpus()
    train_teacher(tmp / "teacher", texts, steps=30)
    teacher = stack.upload("/v1/models", zip_folder(tmp / "teacher", tmp / "teacher.zip"))
    dataset = stack.upload("/v1/datasets", write_text_jsonl(tmp / "d.jsonl", texts[:200], 20))
    epochs = 6
    worker = stack.start_worker()
    job_id = stack.submit(
        {
            "teacher": {"model_id": teacher},
            "dataset_id": dataset,
            "student": {"from_teacher": {"layers": 2, "hidden_size": 32}},
            "distillation": {"method": "kd"},
            # About a second per epoch on a busy machine: batches of 4.
            "training": {"epochs": epochs, "batch_size": 4, "max_length": 32, "baseline": False},
            "export": ["hf"],
        }
    )
    (child,) = stack.wait_until(
        "epoch 2 and a checkpoint", lambda: _mid_job(stack, worker, job_id, 2), 120
    )
    child.kill()
    stack.wait(job_id, TERMINAL, timeout=120)
    _assert_resumed_once(stack, job_id, epochs, measure="perplexity")


def test_a_job_that_loses_its_worker_three_times_fails_worker_lost(
    stack: Stack, inputs: dict[str, str]
) -> None:
    worker = stack.start_worker()
    job_id = stack.submit(_slow_spec(inputs, epochs=500))
    for attempt in (1, 2, 3):
        stack.wait_until(
            f"attempt {attempt}'s job process",
            lambda a=attempt: stack.job(job_id).attempt == a and job_children(worker),
            60,
        )
        for child in job_children(worker):
            child.kill()
    job = stack.wait(job_id, TERMINAL, timeout=30)
    assert (job.status, job.attempt) == ("failed", 3)
    assert job.error["code"] == "worker_lost" and "3 attempts" in job.error["message"]
    # Not retried again: several reconciler passes later nothing has moved.
    time.sleep(3 * float(FAST_SETTINGS["reconcile_seconds"]) + 1)
    job = stack.job(job_id)
    assert (job.status, job.attempt) == ("failed", 3)
    statuses = [e["status"] for e in _statuses(stack, job_id)]
    assert statuses == ["queued", "running", "queued", "running", "queued", "running", "failed"]
    assert stack.artifacts(job_id) == []
    assert stack.blobs_under(f"jobs/{job_id}") == []


def test_a_job_over_the_memory_limit_fails_out_of_memory_without_retries(
    stack: Stack, inputs: dict[str, str]
) -> None:
    limit_mb = 450  # a job process with torch loaded needs about 250 MiB
    stack.start_worker(job_memory_mb=str(limit_mb))
    big = {"preset": "mlp", "width": 4096, "depth": 3}  # about 540 MiB of weights and Adam state
    job_id = stack.submit(
        job_spec(inputs["teacher"], inputs["digits"], epochs=3, student=big, batch_size=32)
    )
    job = stack.wait(job_id, TERMINAL, timeout=90)
    assert job.status == "failed", job.error
    assert job.error["code"] == "out_of_memory"
    assert f"limit of {limit_mb} MiB" in job.error["message"]
    assert "DISTILL_JOB_MEMORY_MB" in job.error["message"]
    time.sleep(LEASE + 2 * float(FAST_SETTINGS["reconcile_seconds"]))
    job = stack.job(job_id)
    assert (job.status, job.attempt) == ("failed", 1)  # no retry loop
    assert [e["status"] for e in _statuses(stack, job_id)] == ["queued", "running", "failed"]


# --- 2. broker loss, API restart ---------------------------------------------------------------


def test_queued_jobs_survive_a_redis_wipe(stack: Stack, inputs: dict[str, str]) -> None:
    assert stack.beat is not None
    stack.beat.stop()  # no reconciler either: only the database remembers the jobs
    stack.procs.remove(stack.beat)
    jobs = [stack.submit(job_spec(inputs["teacher"], inputs["digits"])) for _ in range(3)]
    # The API sends after answering: wait until the three messages are in Redis, then wipe it.
    stack.wait_until("the messages sent", lambda: stack.redis.llen("cpu") == len(jobs), 10)
    stack.redis.flushdb()
    assert stack.redis.dbsize() == 0
    wiped = time.monotonic()
    stack.start_worker()
    stack.start_beat()
    for job_id in jobs:
        job = stack.wait(job_id, TERMINAL, timeout=120)
        assert (job.status, job.attempt) == ("succeeded", 1), job.error
    recovered = time.monotonic() - wiped
    assert recovered < 120
    for job_id in jobs:
        statuses = [e["status"] for e in _statuses(stack, job_id)]
        assert statuses == ["queued", "running", "succeeded"]


def test_restarting_the_api_mid_job_changes_nothing_for_the_job(
    stack: Stack, inputs: dict[str, str]
) -> None:
    epochs = 3
    stack.start_worker()
    job_id = stack.submit(_slow_spec(inputs, epochs))
    stack.wait_until("the first epoch", lambda: stack.events(job_id, "metrics"), 120)
    assert stack.api is not None
    kill_group(stack.api)
    stack.procs.remove(stack.api)
    stack.start_api()  # a new process on a new port
    job = stack.wait(job_id, TERMINAL, timeout=120)
    assert (job.status, job.attempt) == ("succeeded", 1), job.error
    body = stack.http.get(f"/v1/jobs/{job_id}").json()
    assert body["status"] == "succeeded" and body["attempt"] == 1
    # Every epoch once (the last event is the delivered student's figures, without an epoch).
    metrics = [e["epoch"] for e in stack.events(job_id, "metrics") if "epoch" in e]
    assert metrics == list(range(1, epochs + 1))


# --- 3. duplicates -----------------------------------------------------------------------------


def test_a_job_delivered_three_times_runs_once(stack: Stack, inputs: dict[str, str]) -> None:
    job_id = stack.submit(job_spec(inputs["teacher"], inputs["digits"], epochs=2))
    app = make_celery(Settings(**stack.settings))
    for _ in range(2):  # two more copies of the message the API sent
        app.send_task(RUN_JOB_TASK, args=[job_id], queue="cpu")
    workers = [stack.start_worker(), stack.start_worker()]  # racing for the copies
    job = stack.wait(job_id, TERMINAL, timeout=120)
    assert (job.status, job.attempt) == ("succeeded", 1), job.error
    statuses = [e["status"] for e in _statuses(stack, job_id)]
    assert statuses == ["queued", "running", "succeeded"]
    assert [e["epoch"] for e in stack.events(job_id, "metrics") if "epoch" in e] == [1, 2]
    # Each copy is taken and skipped (a copy may wait behind the job in the worker that ran it).
    stack.wait_until(
        "both copies skipped",
        lambda: sum(w.output().count(f"job {job_id} is not queued") for w in workers) >= 2,
        30,
    )
    assert stack.job(job_id).attempt == 1


# --- 4. time -----------------------------------------------------------------------------------


def test_max_minutes_is_enforced(stack: Stack, inputs: dict[str, str]) -> None:
    stack.start_worker()
    spec = _slow_spec(inputs, epochs=500)
    spec["training"]["max_minutes"] = 0.05
    job_id = stack.submit(spec)
    started = time.monotonic()
    job = stack.wait(job_id, TERMINAL, timeout=60)
    assert job.status == "failed" and job.error["code"] == "timeout", job.error
    assert "max_minutes" in job.error["message"]
    assert time.monotonic() - started < 40
    assert stack.artifacts(job_id) == []


def test_a_hanging_teacher_times_out_and_the_worker_takes_the_next_job(
    stack: Stack, inputs: dict[str, str]
) -> None:
    worker = stack.start_worker()
    spec = job_spec(inputs["hang"], inputs["digits"], max_minutes=0.05)
    hung = stack.submit(spec)
    after = stack.submit(job_spec(inputs["teacher"], inputs["digits"]))
    job = stack.wait(hung, TERMINAL, timeout=90)
    assert job.status == "failed" and job.error["code"] == "timeout", job.error
    job = stack.wait(after, TERMINAL, timeout=90)
    assert job.status == "succeeded", job.error
    assert worker.popen.poll() is None
    owners = {e["worker"] for j in (hung, after) for e in _statuses(stack, j) if "worker" in e}
    assert len(owners) == 2 and all(f":{worker.popen.pid}:" in o for o in owners)


def test_a_kill_before_any_memory_sample_is_not_called_out_of_memory() -> None:
    """No sample is no evidence: such a job is left to the reconciler and retried."""
    from worker.runner import looks_out_of_memory

    gib = 2**30
    assert not looks_out_of_memory(0, 0, 8 * gib)
    assert looks_out_of_memory(7 * gib, 1 * gib, 8 * gib)  # near the limit
    assert looks_out_of_memory(gib, gib // 100, 8 * gib)  # the machine had nothing left
    assert not looks_out_of_memory(gib // 4, 4 * gib, 8 * gib)
