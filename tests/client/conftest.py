"""One real service for the client tests: uvicorn (auth on, SQLite) and a Celery worker.

Session-scoped: the SDK and CLI tests share it, with a tiny teacher, a small transfer set and
one finished two-epoch job.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cli.digits import DigitsCNN
from client.sdk import Client
from core.auth import create_key
from core.db import session_factory
from tests.core.model_files import save_exported_program
from tests.service.helpers import Proc, migrate, service_env, start_api, start_worker


@dataclass
class Service:
    url: str
    key: str
    db_url: str
    files: Path
    api: Proc
    worker: Proc

    def client(self, key: str | None = None) -> Client:
        return Client(self.url, key if key is not None else self.key)

    def logs(self) -> str:
        return self.api.output()[-3000:] + "\n" + self.worker.output()[-3000:]


def tiny_spec(teacher_id: str, dataset_id: str, epochs: int = 2, **training: Any) -> dict[str, Any]:
    """A job that runs in a few seconds: a small MLP, two epochs, no baseline."""
    return {
        "teacher": {"model_id": teacher_id},
        "dataset_id": dataset_id,
        "student": {"preset": "mlp", "width": 16, "depth": 1},
        "training": {"epochs": epochs, "batch_size": 64, "baseline": False, **training},
        "export": ["torchscript", "safetensors"],
    }


def write_files(folder: Path) -> tuple[Path, Path]:
    """An (untrained) narrow DigitsCNN as teacher.pt2 and 300 digits as digits.npz."""
    from cli.digits import digits_arrays

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    x, y = digits_arrays()
    teacher = save_exported_program(
        DigitsCNN(width=4).eval(), folder / "teacher.pt2", torch.from_numpy(x[:2])
    )
    data = folder / "digits.npz"
    np.savez(data, x=x[:300], y=y[:300], x_val=x[300:400], y_val=y[300:400])
    return teacher, data


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("client-service")
    db_url = f"sqlite:///{tmp / 'distill.db'}"
    migrate(db_url)
    with session_factory(db_url)() as session:
        _, key = create_key(session, "client-tests")
        session.commit()
    env = service_env(data_dir=str(tmp / "data"), database_url=db_url, auth="on", log_format="json")
    api, url = start_api(env, tmp)
    try:
        worker = start_worker(env, tmp)
    except BaseException:
        api.stop()
        raise
    try:
        yield Service(url, key, db_url, tmp / "files", api, worker)
    finally:
        worker.stop()
        api.stop()


@pytest.fixture(scope="session")
def uploaded(service: Service) -> dict[str, Any]:
    """The tiny teacher and the digits, uploaded once."""
    teacher_path, data_path = write_files(service.files)
    with service.client() as client:
        teacher = client.models.upload(teacher_path, name="tiny-cnn")
        dataset = client.datasets.upload(data_path, name="digits-300")
    return {
        "teacher": teacher,
        "dataset": dataset,
        "teacher_path": teacher_path,
        "data_path": data_path,
    }


@pytest.fixture(scope="session")
def finished_job(service: Service, uploaded: dict[str, Any]) -> Any:
    """One job that ran to the end (two epochs)."""
    with service.client() as client:
        job = client.jobs.create(tiny_spec(uploaded["teacher"].id, uploaded["dataset"].id))
        done = job.wait(progress=False, timeout=180)
    assert done.status == "succeeded", (done.error, service.logs())
    return done
