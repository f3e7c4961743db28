"""API test support: an app on a fresh database with a recorded enqueue, and row factories."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from api.main import create_app
from core.auth import create_key
from core.config import Settings
from core.jobs import add_event
from core.models import Artifact, Dataset, Job, JobModel, Model, new_id
from core.storage import Storage

DIGITS_SIGNATURE = {
    "inputs": [{"shape": [None, 1, 8, 8], "dtype": "float32"}],
    "outputs": [{"shape": [None, 10], "dtype": "float32"}],
}
DIGITS_INFO = {
    "n_samples": 300,
    "x_shape": [None, 1, 8, 8],
    "x_dtype": "float32",
    "has_labels": True,
    "n_classes": 10,
    "y_shape": [None],
    "n_val": None,
}


@dataclass
class Tenant:
    id: str
    name: str
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@dataclass
class Api:
    """A TestClient on an app whose enqueue records job ids instead of calling a broker."""

    app: FastAPI
    client: TestClient
    settings: Settings
    enqueued: list[str] = field(default_factory=list)

    @property
    def storage(self) -> Storage:
        return self.app.state.storage

    def session(self) -> Session:
        return self.app.state.sessions()

    def tenant(self, name: str | None = None) -> Tenant:
        with self.session() as session:
            row, key = create_key(session, name or f"t-{new_id('x')[-8:]}")
            session.commit()
            tenant_id = row.tenant_id
        return Tenant(id=tenant_id, name=name or "", key=key)


def build_api(database_url: str, data_dir: Path, **settings: Any) -> Api:
    """An app on ``database_url`` (already migrated) with blobs and broker under ``data_dir``."""
    config = Settings(
        data_dir=data_dir,
        database_url=database_url,
        broker_url=f"sqla+sqlite:///{data_dir / 'broker.db'}",
        **settings,
    )
    app = create_app(config)
    api = Api(app=app, client=TestClient(app), settings=config)

    def record(job: Job) -> None:
        api.enqueued.append(job.id)

    app.state.enqueue = record
    return api


# --- factories -------------------------------------------------------------------------------


def insert_model(
    session: Session,
    tenant_id: str,
    *,
    signature: dict[str, Any] | None = None,
    format: str = "exported_program",
    trainable: bool = True,
    name: str = "teacher",
) -> Model:
    model = Model(
        id=new_id("mdl"),
        tenant_id=tenant_id,
        name=name,
        format=format,
        size_bytes=123,
        sha256="0" * 64,
        parameters=1000,
        signature=signature or DIGITS_SIGNATURE,
        trainable=trainable,
        storage_key=f"models/{tenant_id}/x.pt2",
    )
    session.add(model)
    session.commit()
    return model


def insert_dataset(session: Session, tenant_id: str, **info: Any) -> Dataset:
    full = {**DIGITS_INFO, **info}
    dataset = Dataset(
        id=new_id("ds"),
        tenant_id=tenant_id,
        name="digits",
        format="npz",
        options={},
        n_samples=full["n_samples"],
        x_shape=full["x_shape"],
        x_dtype=full["x_dtype"],
        has_labels=full["has_labels"],
        n_classes=full["n_classes"],
        info=full,
        size_bytes=456,
        sha256="1" * 64,
        storage_key=f"datasets/{tenant_id}/x.npz",
    )
    session.add(dataset)
    session.commit()
    return dataset


def insert_job(
    session: Session, tenant_id: str, *, status: str = "queued", model_ids: tuple[str, ...] = ()
) -> Job:
    job = Job(
        id=new_id("job"),
        tenant_id=tenant_id,
        status=status,
        spec={"training": {"epochs": 3}, "dataset_id": "ds_x"},
    )
    session.add(job)
    session.flush()
    session.add_all(JobModel(job_id=job.id, model_id=m) for m in model_ids)
    add_event(session, job.id, "status", {"status": "queued"})
    session.commit()
    return job


def insert_artifact(
    session: Session, storage: Storage, job: Job, data: bytes, name: str = "student.onnx"
) -> Artifact:
    key = f"artifacts/{job.tenant_id}/{job.id}/{name}"
    blob = storage.put_stream(key, [data], max_bytes=len(data) + 1)
    assert blob.sha256 == hashlib.sha256(data).hexdigest()
    artifact = Artifact(
        id=new_id("art"),
        job_id=job.id,
        tenant_id=job.tenant_id,
        name=name,
        kind="student_onnx",
        size_bytes=blob.size,
        sha256=blob.sha256,
        storage_key=key,
    )
    session.add(artifact)
    session.commit()
    return artifact
