"""The rows a new job is stored as: the job, its links to its uploads, its first event, its key."""

from __future__ import annotations

from typing import Any

from core.config import Settings
from core.job_creation.statements import Inserts
from core.models import IdempotencyKey, Job, JobDataset, JobEvent, JobModel, new_id, utcnow
from core.spec import JobSpec

JOBS, KEYS, EVENTS = Job.__table__, IdempotencyKey.__table__, JobEvent.__table__
JOB_MODELS, JOB_DATASETS = JobModel.__table__, JobDataset.__table__


def choose_queue(spec: JobSpec, settings: Settings) -> str:
    """``gpu`` when the job asks for CUDA (for the student or the teacher), or says ``auto``
    and GPU workers exist; else ``cpu``."""
    device = spec.training.device
    teacher = spec.training.teacher_device or ""
    if device.startswith("cuda") or teacher.startswith("cuda"):
        return "gpu"
    return "gpu" if device == "auto" and settings.gpu_workers else "cpu"


def new_job_row(
    tenant_id: str,
    spec: JobSpec,
    settings: Settings,
    idempotency_key: str | None = None,
    digest: str | None = None,
) -> dict[str, Any]:
    """A queued job's columns, by name (``digest``: the hash of the body its key was sent with)."""
    now = utcnow()
    return dict(
        id=new_id("job"),
        tenant_id=tenant_id,
        parent_id=None,
        name=spec.name,
        status="queued",
        queue=choose_queue(spec, settings),
        spec=spec.model_dump(mode="json"),
        progress={},
        metrics={},
        result=None,
        error=None,
        attempt=0,
        cancel_requested=False,
        idempotency_key=idempotency_key,
        request_hash=digest,
        created_at=now,
        enqueued_at=now,  # recorded with the job; the send follows the commit
        started_at=None,
        finished_at=None,
    )


def job_inserts(jobs: list[tuple[dict[str, Any], list[str]]]) -> Inserts:
    """Each table's rows for these jobs (each a job's row and the ids of the models it uses):
    the jobs, their links to their models and dataset, their first events and their keys,
    a row's parent first."""
    links = [{"job_id": c["id"], "model_id": m} for c, model_ids in jobs for m in model_ids]
    dataset_links = [{"job_id": c["id"], "dataset_id": c["spec"]["dataset_id"]} for c, _ in jobs]
    events = [
        {
            "job_id": c["id"],
            "seq": 1,
            "type": "status",
            "data": {"status": "queued"},
            "at": c["created_at"],
        }
        for c, _ in jobs
    ]
    keys = [
        {
            "tenant_id": c["tenant_id"],
            "key": c["idempotency_key"],
            "request_hash": c["request_hash"],
            "job_id": c["id"],
            "created_at": c["created_at"],
        }
        for c, _ in jobs
        if c["idempotency_key"] is not None
    ]
    return [
        (JOBS, [c for c, _ in jobs]),
        (JOB_MODELS, links),
        (JOB_DATASETS, dataset_links),
        (EVENTS, events),
        (KEYS, keys),
    ]
