"""Run one claimed job: the engine in a spawned child, supervised by the worker.

The parent (this module, inside a Celery task) fetches the inputs into a per-job work folder,
restores the job's checkpoints from storage so a re-queued job resumes on any worker, starts the
child, and then, until the child ends: writes its events to the database, uploads new checkpoints,
renews the lease, watches for a cancel request and enforces ``training.max_minutes``. Nothing
here imports torch; only the child does.

How a child that ends without an answer is settled:

- stopped by us for a cancel request → ``cancelled``; for the time limit → ``timeout``;
- over ``DISTILL_JOB_MEMORY_MB`` (sampled twice a second) → killed at once, ``out_of_memory``;
- killed by a signal while its memory was close to the machine's limit → ``out_of_memory``
  (neither is retried: the same job on the same kind of worker would die the same way);
- killed by a signal otherwise (an operator, a node drain) → left ``running``: its heartbeat
  stops and the reconciler re-queues it as ``worker_lost`` while attempts remain, so a transient
  kill is retried from the last checkpoint and a job that keeps killing workers ends failed;
- exited with a non-zero code and no answer → ``internal``.
"""

from __future__ import annotations

import json
import logging
import os
import select as io_select
import shutil
import subprocess
import sys
import time
from contextlib import suppress
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import psutil
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from core.config import Settings
from core.distill import cage
from core.distill.cage import Isolation
from core.errors import InvalidSpec, JobTimeout, OutOfDisk, OutOfMemory, UnsafeModelFile
from core.jobs import (
    TERMINAL_STATUSES,
    NewArtifact,
    add_event,
    fail_job,
    finish_job,
    heartbeat,
    mark_cancelled,
)
from core.logging import bind_log_context
from core.models import Dataset, Job, Model
from core.spec import JobSpec
from core.storage import Storage
from worker import protocol, teacher_cache
from worker.checkpoints import (
    delete_checkpoints,
    download,
    restore_checkpoints,
    sync_checkpoints,
)
from worker.protocol import SERVICE_ENGINE, Failure, JobPayload, Message, ModelInput, Outcome

log = logging.getLogger(__name__)

MODEL_SUFFIX = {
    "exported_program": ".pt2",
    "onnx": ".onnx",
    "safetensors": ".safetensors",
    "torchscript": ".pt",
}
CANCEL_POLL_SECONDS = 0.5
PROGRESS_EVERY_SECONDS = 1.0
CHECKPOINT_SCAN_SECONDS = 2.0
STOP_GRACE_SECONDS = 1.5  # after asking the child to stop, before SIGTERM
KILL_GRACE_SECONDS = 1.0  # after SIGTERM, before SIGKILL
EXIT_GRACE_SECONDS = 10.0  # after the child closed its pipe, before SIGKILL
TIMEOUT_SLACK_SECONDS = 5.0  # the engine enforces max_minutes itself; this is the backstop
TEACHER_CACHE_ENV = "DISTILL_LM_CACHE_DIR"  # read by core/distill/causal/cache.py
MAX_MESSAGE_BYTES = 32 * 2**20  # one message of the job process (its outcome is the largest)
_ROOT = Path(__file__).resolve().parents[1]  # the folder holding the `worker` package


def artifact_key(job_id: str, attempt: int, name: str) -> str:
    return f"jobs/{job_id}/attempt-{attempt}/{name}"


class RunEnd(StrEnum):
    """How :func:`run_claimed_job` left a job: its return value, never stored (the job's row
    keeps its own statuses)."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TAKEN_OVER = "taken_over"  # another actor holds the job now; nothing was recorded
    LEFT_TO_RECONCILER = "left_to_reconciler"  # the child was killed; the job stays running


@dataclass
class _ChildState:
    """What the parent knows about the supervised child while it runs and once it has ended."""

    outcome: Outcome | None = None
    error: dict[str, Any] | None = None
    stop_reason: str | None = None  # cancel | timeout | taken_over | memory | disk
    stop_asked_at: float | None = None
    terminated_at: float | None = None
    last_rss: int = 0
    last_available: int = 0
    pending_progress: dict[str, Any] | None = None
    exitcode: int | None = None
    checkpoints: dict[str, tuple[int, int]] = field(default_factory=dict)


def run_claimed_job(
    job_id: str,
    owner: str,
    *,
    settings: Settings,
    session_factory: sessionmaker[Session],
    storage: Storage | None = None,
    engine: str = SERVICE_ENGINE,
) -> RunEnd:
    """Run a job this worker has claimed; record how it ended; return how it ended.

    The return value is ``succeeded``, ``failed``, ``cancelled``, ``taken_over`` (another actor
    holds the job now: a lost lease, a cancel settled elsewhere) or ``left_to_reconciler`` (the
    child was killed by a signal; the job stays ``running`` for the reconciler to re-queue).
    Errors found before the child starts (a deleted model, an unreadable blob) are raised for
    the task to record.
    """
    if storage is None:
        storage = open_storage(settings)
    work = (settings.data_dir / "work" / job_id).resolve()
    shutil.rmtree(work, ignore_errors=True)
    try:
        with session_factory() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise InvalidSpec(f"job {job_id} does not exist", field="job_id")
            payload = _prepare(session, job, storage, work, engine, settings.isolation)
            attempt, tenant_id = job.attempt, job.tenant_id
            cache_inputs = teacher_cache.cache_inputs(session, job)
        # One tenant's jobs share their teacher caches; another tenant's are out of reach.
        cache_dir = settings.teacher_cache_root / tenant_id
        payload.cache_dir = str(cache_dir)
        if settings.tensorboard_dir is not None:
            payload.tensorboard_dir = str((settings.tensorboard_dir / job_id).resolve())
        restore_checkpoints(storage, job_id, Path(payload.work_dir))
        if cache_inputs is not None:
            _fetch_teacher_caches(
                job_id, owner, tenant_id, cache_inputs, storage, settings, session_factory
            )
        try:
            state = _supervise(job_id, owner, payload, settings, session_factory, storage)
            return _settle(
                job_id, owner, attempt, state, payload, session_factory, storage, settings
            )
        finally:
            stored = teacher_cache.publish(
                storage, tenant_id, cache_dir, settings.job_disk_mb * 2**20
            )
            if stored:
                log.info("teacher caches stored for tenant %s: %s", tenant_id, stored)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        with session_factory() as session:
            status = session.scalar(select(Job.status).where(Job.id == job_id))
        if status in TERMINAL_STATUSES:
            delete_checkpoints(storage, job_id)


def _fetch_teacher_caches(
    job_id: str,
    owner: str,
    tenant_id: str,
    inputs: teacher_cache.CacheInputs,
    storage: Storage,
    settings: Settings,
    session_factory: sessionmaker[Session],
) -> None:
    """Bring this job's teacher caches from storage, renewing the lease while they download."""
    next_beat = time.monotonic() + settings.heartbeat_seconds

    def keep_alive() -> None:
        nonlocal next_beat
        if time.monotonic() >= next_beat:
            next_beat = time.monotonic() + settings.heartbeat_seconds
            with session_factory() as session:
                heartbeat(session, job_id, owner, settings.lease_seconds)

    cache_dir = settings.teacher_cache_root / tenant_id
    brought = teacher_cache.fetch(storage, tenant_id, cache_dir, inputs, keep_alive)
    if brought:
        message = f"teacher cache: brought {', '.join(brought)} from storage"
        with session_factory() as session:
            add_event(session, job_id, "log", {"message": message})
            session.commit()


def open_storage(settings: Settings) -> Storage:
    """The blob store named by the settings."""
    from core.storage import get_storage

    return get_storage(settings.storage, s3_endpoint_url=settings.s3_endpoint_url)


# --- inputs ----------------------------------------------------------------------------------


def _prepare(
    session: Session, job: Job, storage: Storage, work: Path, engine: str, isolation: Isolation
) -> JobPayload:
    """Download the job's models and dataset; the child's payload."""
    bind_log_context(tenant=job.tenant_id)
    spec = JobSpec.model_validate(job.spec)
    ids = [r.ref.model_id for r in spec.model_refs() if r.ref.model_id]
    inputs = work / "inputs"
    inputs.mkdir(parents=True)
    models: dict[str, ModelInput] = {}
    for model_id in dict.fromkeys(ids):
        model = session.scalar(
            select(Model).where(Model.id == model_id, Model.tenant_id == job.tenant_id)
        )
        if model is None:
            raise InvalidSpec(
                f"model {model_id} no longer exists; upload it again and submit a new job",
                field="teacher",
            )
        refusal = isolation.refuse_program(model.format)
        if refusal is not None:
            raise UnsafeModelFile(refusal, details={"model_id": model.id})
        path = inputs / f"{model.id}{MODEL_SUFFIX.get(model.format, '')}"
        download(storage, model.storage_key, path)
        models[model_id] = ModelInput(str(path), model.format, model.arch, model.arch_config)
    dataset = session.scalar(
        select(Dataset).where(Dataset.id == spec.dataset_id, Dataset.tenant_id == job.tenant_id)
    )
    if dataset is None:
        raise InvalidSpec(
            f"dataset {spec.dataset_id} no longer exists; upload it again and submit a new job",
            field="dataset_id",
        )
    # The engine reads the format from the file name.
    data_path = inputs / f"dataset.{dataset.format}"
    download(storage, dataset.storage_key, data_path)
    return JobPayload(
        engine=engine,
        spec=job.spec,
        models=models,
        dataset=str(data_path),
        dataset_options=dict(dataset.options or {}),
        out_dir=str(work / "output" / f"out-{job.attempt}"),
        work_dir=str(work / "checkpoints"),
        scratch=str(work / "scratch"),
        caged=isolation.caged,
        max_seconds=spec.training.max_minutes * 60,
    )


# --- the child and its supervision -----------------------------------------------------------


def _supervise(
    job_id: str,
    owner: str,
    payload: JobPayload,
    settings: Settings,
    session_factory: sessionmaker[Session],
    storage: Storage,
) -> _ChildState:
    proc = _start_child(payload, settings.isolation)
    channel = _MessageChannel(proc)
    state = _ChildState()
    work_dir = Path(payload.work_dir)
    started = time.monotonic()
    deadline = started + payload.max_seconds + TIMEOUT_SLACK_SECONDS
    next_poll = next_beat = next_progress = next_scan = started
    eof, eof_at = False, 0.0
    try:
        while True:
            if not eof:
                try:
                    for message in channel.receive(0.1):
                        _handle(message, job_id, owner, state, session_factory)
                except EOFError:
                    eof, eof_at = True, time.monotonic()
                except ChildMessageError as exc:
                    state.error = {"code": "internal", "message": str(exc)}
                    proc.kill()
            else:
                with suppress(subprocess.TimeoutExpired):
                    proc.wait(0.1)
                if proc.poll() is None and time.monotonic() - eof_at > EXIT_GRACE_SECONDS:
                    proc.kill()  # it said all it had to say but does not exit
            if eof and proc.poll() is not None:
                break
            now = time.monotonic()
            if state.stop_reason is None:
                if now >= next_poll:
                    next_poll = now + CANCEL_POLL_SECONDS
                    _sample_memory(proc.pid, state)
                    if _over_memory(state, settings):
                        state.stop_reason = "memory"
                        proc.kill()  # no grace: it would only grow further
                    else:
                        state.stop_reason = _should_stop(job_id, owner, session_factory)
                if state.stop_reason is None and now >= next_beat:
                    next_beat = now + settings.heartbeat_seconds
                    with session_factory() as session:
                        if not heartbeat(session, job_id, owner, settings.lease_seconds):
                            state.stop_reason = _should_stop(job_id, owner, session_factory)
                            state.stop_reason = state.stop_reason or "taken_over"
                if state.stop_reason is None and now >= deadline:
                    state.stop_reason = "timeout"
                if state.stop_reason is not None:
                    log.info("stopping %s: %s", job_id, state.stop_reason)
                    _ask_to_stop(proc)
                    state.stop_asked_at = now
            else:
                _escalate(proc, state, now)
            if now >= next_progress:
                next_progress = now + PROGRESS_EVERY_SECONDS
                _flush_progress(job_id, owner, state, session_factory)
            if now >= next_scan and state.stop_reason is None:
                next_scan = now + CHECKPOINT_SCAN_SECONDS
                sync_checkpoints(storage, job_id, work_dir, state.checkpoints)
                if _over_disk(payload, settings):
                    state.stop_reason = "disk"
                    proc.kill()
        _flush_progress(job_id, owner, state, session_factory)
    finally:
        if proc.poll() is None:
            proc.kill()
            with suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        channel.close()
    returncode = proc.poll()
    if returncode is not None and payload.caged:
        returncode = cage.exit_status(returncode)
    state.exitcode = returncode
    return state


def _start_child(payload: JobPayload, isolation: Isolation) -> subprocess.Popen[bytes]:
    """Start the job process, caged when the worker has a cage, and hand it its payload."""
    argv = [sys.executable, "-m", "worker.child"]
    env: dict[str, str] | None = None
    cache_env = {TEACHER_CACHE_ENV: payload.cache_dir} if payload.cache_dir else {}
    shared = [Path(payload.cache_dir)] if payload.cache_dir else []
    for folder in [*payload.written_folders(), *shared]:
        folder.mkdir(parents=True, exist_ok=True)
    if isolation.caged:
        for folder in payload.written_folders():
            cage.share_writable(folder)
        for path in payload.inputs_dir.iterdir():
            cage.share_read_only(path)
        for folder in shared:
            cage.share_writable(folder)
        argv = cage.command(
            argv,
            scratch=Path(payload.scratch),
            read_only=[payload.inputs_dir],
            writable=[f for f in payload.written_folders() if f != Path(payload.scratch)] + shared,
            env=cache_env,
            code_packages=tuple(dict.fromkeys((*cage.PROJECT_PACKAGES, payload.engine_package))),
        )
    else:
        env = dict(os.environ) | cache_env
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        cwd=payload.scratch,
        start_new_session=True,  # a signal to the worker's group does not reach the job
    )
    assert proc.stdin is not None
    proc.stdin.write(payload.to_json().encode() + b"\n")
    proc.stdin.flush()
    return proc


def _ask_to_stop(proc: subprocess.Popen[bytes]) -> None:
    with suppress(OSError, ValueError):
        assert proc.stdin is not None
        proc.stdin.write(b"stop\n")
        proc.stdin.flush()


class ChildMessageError(Exception):
    """The job process sent something that is not a message."""


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


class _MessageChannel:
    """The job process's messages: JSON objects, one a line, each at most MAX_MESSAGE_BYTES."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self._fd = proc.stdout.fileno()
        self._proc = proc
        self._buffer = b""

    def receive(self, timeout: float) -> list[Message]:
        """The complete messages that arrived within ``timeout``; EOFError once it is closed."""
        ready, _, _ = io_select.select([self._fd], [], [], timeout)
        if not ready:
            return []
        chunk = os.read(self._fd, 1 << 20)
        if not chunk:
            raise EOFError
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        if len(self._buffer) > MAX_MESSAGE_BYTES:
            raise ChildMessageError(
                f"the job process sent a message of more than {MAX_MESSAGE_BYTES} bytes"
            )
        messages = []
        for line in lines:
            if b"\\u0000" in line:  # the database's JSON types refuse NUL characters
                raise ChildMessageError("the job process sent a NUL character")
            try:
                message = json.loads(line, parse_constant=_refuse_constant)
            except ValueError:
                raise ChildMessageError(
                    "the job process sent a line that is not JSON (or holds NaN or Infinity)"
                ) from None
            try:
                messages.append(protocol.decode(message))
            except ValueError as exc:
                raise ChildMessageError(f"the job process sent a bad message: {exc}") from None
        return messages

    def close(self) -> None:
        for pipe in (self._proc.stdin, self._proc.stdout):
            with suppress(OSError):
                if pipe is not None:
                    pipe.close()


def _escalate(proc: subprocess.Popen[bytes], state: _ChildState, now: float) -> None:
    """After a stop request: SIGTERM once the grace period is over, then SIGKILL."""
    if proc.poll() is not None or state.stop_asked_at is None:
        return
    if state.terminated_at is None and now - state.stop_asked_at >= STOP_GRACE_SECONDS:
        proc.terminate()
        state.terminated_at = now
    elif state.terminated_at is not None and now - state.terminated_at >= KILL_GRACE_SECONDS:
        proc.kill()


def _handle(
    message: Message,
    job_id: str,
    owner: str,
    state: _ChildState,
    session_factory: sessionmaker[Session],
) -> None:
    if isinstance(message, Outcome):
        state.outcome = message
    elif isinstance(message, Failure):
        state.error = message.error
    elif message.type == "progress":
        state.pending_progress = message.data  # written at most once a second
    elif message.type == "metrics":
        with session_factory() as session:
            if _owned_update(session, job_id, owner, metrics=message.data):
                add_event(session, job_id, "metrics", message.data)
            session.commit()
    elif message.type == "log":
        with session_factory() as session:
            add_event(session, job_id, "log", message.data)
            session.commit()


def _owned_update(session: Session, job_id: str, owner: str, **values: Any) -> bool:
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == owner)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def _flush_progress(
    job_id: str, owner: str, state: _ChildState, session_factory: sessionmaker[Session]
) -> None:
    if state.pending_progress is None:
        return
    with session_factory() as session:
        _owned_update(session, job_id, owner, progress=state.pending_progress)
        session.commit()
    state.pending_progress = None


def _should_stop(job_id: str, owner: str, session_factory: sessionmaker[Session]) -> str | None:
    with session_factory() as session:
        row = session.execute(
            select(Job.status, Job.cancel_requested, Job.lease_owner).where(Job.id == job_id)
        ).first()
    if row is None:
        return "taken_over"
    status, cancel_requested, lease_owner = row
    if lease_owner != owner or status not in ("running", "cancelling"):
        return "taken_over"
    if cancel_requested or status == "cancelling":
        return "cancel"
    return None


def _sample_memory(pid: int | None, state: _ChildState) -> None:
    with suppress(psutil.Error, TypeError):
        proc = psutil.Process(pid)
        rss = proc.memory_info().rss
        for child in proc.children(recursive=True):
            with suppress(psutil.Error):
                rss += child.memory_info().rss
        state.last_rss = rss
        state.last_available = psutil.virtual_memory().available


def _written_bytes(payload: JobPayload) -> int:
    total = 0
    for folder in payload.written_folders():
        for path in folder.rglob("*"):
            with suppress(OSError):
                total += path.lstat().st_size
    return total


def _over_disk(payload: JobPayload, settings: Settings) -> bool:
    return _written_bytes(payload) > settings.job_disk_mb * 2**20


def _over_memory(state: _ChildState, settings: Settings) -> bool:
    limit = settings.job_memory_mb
    return limit is not None and state.last_rss > limit * 2**20


def memory_limit_bytes(job_memory_mb: int | None = None) -> int:
    """The memory a job can use here: ``job_memory_mb`` when set, the cgroup's limit when there
    is one, else physical RAM (the smallest of them)."""
    total = psutil.virtual_memory().total
    if job_memory_mb is not None:
        total = min(total, job_memory_mb * 2**20)
    with suppress(OSError, ValueError):
        text = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if text != "max":
            return min(total, int(text))
    return total


def looks_out_of_memory(rss: int, available: int, limit: int) -> bool:
    """Whether a child killed by a signal was probably killed for memory (sampled heuristic).

    No sample (killed before the first one) is not evidence of memory trouble: the job is left
    to the reconciler, whose retry budget bounds the cost of a wrong guess.
    """
    if rss <= 0 and available <= 0:
        return False
    return rss >= 0.8 * limit or available <= 0.05 * limit


# --- the end ---------------------------------------------------------------------------------


def _settle(
    job_id: str,
    owner: str,
    attempt: int,
    state: _ChildState,
    payload: JobPayload,
    session_factory: sessionmaker[Session],
    storage: Storage,
    settings: Settings,
) -> RunEnd:
    exitcode = state.exitcode
    job_memory_mb = settings.job_memory_mb
    with session_factory() as session:
        if state.stop_reason == "taken_over":
            return RunEnd.TAKEN_OVER
        if state.stop_reason == "cancel":
            return (
                RunEnd.CANCELLED
                if mark_cancelled(session, job_id, owner=owner)
                else RunEnd.TAKEN_OVER
            )
        if state.stop_reason == "timeout":
            minutes = payload.max_seconds / 60
            error = JobTimeout(
                f"the job ran longer than training.max_minutes ({minutes:g}); raise max_minutes "
                "or use fewer epochs or a smaller student"
            ).to_dict()
            return (
                RunEnd.FAILED
                if fail_job(session, job_id, error, owner=owner)
                else RunEnd.TAKEN_OVER
            )
        if state.stop_reason == "memory":
            error = OutOfMemory(
                f"the job process used {state.last_rss / 2**20:.0f} MiB, over this worker's "
                f"limit of {job_memory_mb} MiB (DISTILL_JOB_MEMORY_MB), and was stopped; use a "
                "smaller batch_size or student, or a worker with more memory"
            ).to_dict()
            return (
                RunEnd.FAILED
                if fail_job(session, job_id, error, owner=owner)
                else RunEnd.TAKEN_OVER
            )
        if state.stop_reason == "disk":
            error = OutOfDisk(
                f"the job wrote more than this worker's limit of {settings.job_disk_mb} MiB "
                "(DISTILL_JOB_DISK_MB) and was stopped; use a smaller student or fewer exports"
            ).to_dict()
            return (
                RunEnd.FAILED
                if fail_job(session, job_id, error, owner=owner)
                else RunEnd.TAKEN_OVER
            )
        if state.outcome is not None and exitcode == 0:
            return _succeed(session, job_id, owner, attempt, state.outcome, payload, storage)
        if state.error is not None:
            if _cancel_requested(session, job_id):
                return (
                    RunEnd.CANCELLED
                    if mark_cancelled(session, job_id, owner=owner)
                    else RunEnd.TAKEN_OVER
                )
            return (
                RunEnd.FAILED
                if fail_job(session, job_id, state.error, owner=owner)
                else RunEnd.TAKEN_OVER
            )
        if exitcode is not None and exitcode < 0:
            limit = memory_limit_bytes(job_memory_mb)
            if looks_out_of_memory(state.last_rss, state.last_available, limit):
                error = OutOfMemory(
                    f"the job process was killed while using {state.last_rss / 2**20:.0f} MiB, "
                    "close to this worker's memory; use a smaller batch_size or student, or a "
                    "worker with more memory"
                ).to_dict()
                return (
                    RunEnd.FAILED
                    if fail_job(session, job_id, error, owner=owner)
                    else RunEnd.TAKEN_OVER
                )
            log.warning(
                "the process of %s was killed by signal %d; the reconciler will retry it",
                job_id,
                -exitcode,
            )
            return RunEnd.LEFT_TO_RECONCILER
        error = {
            "code": "internal",
            "message": f"the job process exited with code {exitcode} without a result",
        }
        return RunEnd.FAILED if fail_job(session, job_id, error, owner=owner) else RunEnd.TAKEN_OVER


def _cancel_requested(session: Session, job_id: str) -> bool:
    return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def _succeed(
    session: Session,
    job_id: str,
    owner: str,
    attempt: int,
    outcome: Outcome,
    payload: JobPayload,
    storage: Storage,
) -> RunEnd:
    out_dir = Path(payload.out_dir).resolve()
    uploaded: list[NewArtifact] = []
    try:
        for item in outcome.artifacts:
            path = Path(item["path"]).resolve()
            if not path.is_relative_to(out_dir) or not path.is_file():
                raise RuntimeError(f"the engine named an artifact outside its folder: {path}")
            key = artifact_key(job_id, attempt, path.name)
            blob = storage.put_file(key, path)
            uploaded.append(
                NewArtifact(
                    name=str(item["name"]),
                    kind=str(item["kind"]),
                    size_bytes=blob.size,
                    sha256=blob.sha256,
                    storage_key=blob.key,
                )
            )
        if finish_job(session, job_id, owner, outcome.result, uploaded):
            return RunEnd.SUCCEEDED
    except BaseException:
        _delete_blobs(storage, uploaded)
        raise
    # Not ours to finish: cancelled meanwhile (keep no artifacts) or the lease was lost.
    _delete_blobs(storage, uploaded)
    if _cancel_requested(session, job_id):
        return (
            RunEnd.CANCELLED if mark_cancelled(session, job_id, owner=owner) else RunEnd.TAKEN_OVER
        )
    return RunEnd.TAKEN_OVER


def _delete_blobs(storage: Storage, artifacts: list[NewArtifact]) -> None:
    for item in artifacts:
        with suppress(Exception):
            storage.delete(item.storage_key)
