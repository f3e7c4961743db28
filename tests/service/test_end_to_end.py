"""End to end through real HTTP: uvicorn and a Celery worker as subprocesses, real training.

Once on the embedded defaults (SQLite, the SQLite broker, a local storage folder) and once on
PostgreSQL + Redis. A user uploads a teacher and the digits, distils a student, downloads every
artifact, loads each with its standard loader and gets the accuracy the job reported.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
import torch

from cli.digits import DigitsCNN, train_classifier
from core.auth import create_key
from core.db import session_factory
from tests.core.model_files import save_exported_program, save_onnx
from tests.service.helpers import fresh_postgres, migrate, service_env, start_api, start_worker

pytestmark = [pytest.mark.service, pytest.mark.slow]
REDIS_DB = 12  # this module's own Redis database, flushed before and after


class Service:
    def __init__(self, stack: str, base: str, headers: dict[str, str], logs: Path) -> None:
        self.stack = stack
        self.http = httpx.Client(base_url=base, headers=headers, timeout=60)
        self.logs = logs

    def upload(self, route: str, path: Path, **fields: str) -> dict[str, Any]:
        with path.open("rb") as f:
            r = self.http.post(route, files={"file": (path.name, f)}, data=fields)
        assert r.status_code == 201, r.text
        return r.json()

    def wait(self, job_id: str, statuses: set[str], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            job = self.http.get(f"/v1/jobs/{job_id}").json()
            if job["status"] in statuses:
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"job is {job['status']} after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.1)

    def events(self, job_id: str) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        while True:
            after = events[-1]["seq"] if events else 0
            page = self.http.get(f"/v1/jobs/{job_id}/events", params={"after": after}).json()
            events += page["data"]
            if not page["has_more"]:
                return events

    def log_tail(self) -> str:
        return "\n".join(p.read_text()[-3000:] for p in sorted(self.logs.glob("*.log")))


@pytest.fixture(scope="module", params=["embedded", "postgres-redis"])
def service(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    """The API and one worker on a fresh database (and Redis db) for this module."""
    tmp = tmp_path_factory.mktemp(request.param)
    settings = {"data_dir": str(tmp / "data"), "storage_url": f"file://{tmp / 'blobs'}"}
    with _database(request, tmp) as extra:
        settings.update(extra)
        migrate(settings["database_url"])
        headers: dict[str, str] = {}
        if request.param == "embedded":
            settings["auth"] = "off"  # as `distill serve` on 127.0.0.1
        else:
            with session_factory(settings["database_url"])() as session:
                _, key = create_key(session, "e2e")
                session.commit()
            headers = {"Authorization": f"Bearer {key}"}
        env = service_env(**settings)
        api, base = start_api(env, tmp)
        try:
            worker = start_worker(env, tmp)
        except BaseException:
            api.stop()
            raise
        try:
            yield Service(request.param, base, headers, tmp)
        finally:
            worker.stop()
            api.stop()


@contextmanager
def _database(request: pytest.FixtureRequest, tmp: Path) -> Iterator[dict[str, str]]:
    """Settings naming an empty database (and broker) for the stack under test."""
    if request.param == "embedded":
        yield {"database_url": f"sqlite:///{tmp / 'distill.db'}"}
        return
    pg = _service_url("postgres_url")
    broker = _service_url("redis_url").rsplit("/", 1)[0] + f"/{REDIS_DB}"
    client = redis.Redis.from_url(broker)
    client.flushdb()
    try:
        with fresh_postgres(pg) as url:
            yield {"database_url": url, "broker_url": broker}
    finally:
        client.flushdb()


def _service_url(name: str) -> str:
    # postgres_url/redis_url are function-scoped; call their check directly for a module fixture.
    from tests.conftest import POSTGRES_URL, REDIS_URL, require_service

    if name == "postgres_url":
        require_service("PostgreSQL", "127.0.0.1", 5432)
        return POSTGRES_URL
    require_service("Redis", "127.0.0.1", 6379)
    return REDIS_URL


@pytest.fixture(scope="module")
def teacher(digits: dict[str, np.ndarray]) -> torch.nn.Module:
    """A narrow DigitsCNN (about 95% on the test split): quick to train on a busy machine."""
    torch.manual_seed(0)
    return train_classifier(DigitsCNN(width=8), digits["x_train"], digits["y_train"], epochs=12)


@pytest.fixture(scope="module")
def uploads(
    service: Service,
    digits: dict[str, np.ndarray],
    teacher: torch.nn.Module,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Any]:
    """Both teacher files and the digits (their test split given as the validation split)."""
    folder = tmp_path_factory.mktemp("files")
    example = torch.from_numpy(digits["x_train"][:2])
    ep = save_exported_program(teacher, folder / "teacher.pt2", example)
    onnx_file = save_onnx(teacher, folder / "teacher.onnx", example)
    data = folder / "digits.npz"
    np.savez(
        data,
        x=digits["x_train"],
        y=digits["y_train"],
        x_val=digits["x_test"],
        y_val=digits["y_test"],
    )
    return {
        "exported_program": service.upload("/v1/models", ep, name="cnn-ep"),
        "onnx": service.upload("/v1/models", onnx_file, name="cnn-onnx"),
        "dataset": service.upload("/v1/datasets", data, name="digits"),
    }


def _spec(teacher_id: str, dataset_id: str, epochs: int, **training: Any) -> dict[str, Any]:
    return {
        "teacher": {"model_id": teacher_id},
        "dataset_id": dataset_id,
        "student": {"preset": "mlp", "width": 64, "depth": 1},
        "training": {
            "epochs": epochs,
            "batch_size": 64,
            "lr": 0.005,
            "baseline": False,
            **training,
        },
        "export": ["torchscript", "onnx", "safetensors"],
    }


# One teacher format per stack keeps the module short; both formats are uploaded on both.
TEACHER_FOR_STACK = {"embedded": "exported_program", "postgres-redis": "onnx"}


def test_distil_download_and_reproduce(
    service: Service, uploads: dict[str, Any], digits: dict[str, np.ndarray]
) -> None:
    assert uploads["exported_program"]["format"] == "exported_program"
    assert uploads["onnx"]["format"] == "onnx"
    teacher_format = TEACHER_FOR_STACK[service.stack]
    epochs = 5
    spec = _spec(uploads[teacher_format]["id"], uploads["dataset"]["id"], epochs)
    r = service.http.post("/v1/jobs", json=spec)
    assert r.status_code == 201, r.text
    job = service.wait(r.json()["id"], {"succeeded", "failed", "cancelled"}, timeout=120)
    assert job["status"] == "succeeded", job["error"]
    assert job["attempt"] == 1 and job["finished_at"] is not None

    events = service.events(job["id"])
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    statuses = [e["data"]["status"] for e in events if e["type"] == "status"]
    assert statuses == ["queued", "running", "succeeded"]
    metrics = [e["data"] for e in events if e["type"] == "metrics"]
    # Exactly one metrics event per epoch, in order, then the delivered student's figures,
    # which are the job's metrics after success.
    assert [m["epoch"] for m in metrics[:-1]] == list(range(1, epochs + 1))
    assert metrics[-1]["final"] is True and "epoch" not in metrics[-1]
    assert job["metrics"] == metrics[-1]

    reported = job["result"]["student"]["accuracy"]
    assert reported > 0.8, job["result"]  # a useful student, not just a working pipeline
    x_val, y_val = digits["x_test"], digits["y_test"]
    files = _download_all(service, job["id"])
    assert {"student.pt", "student.onnx", "student.safetensors", "report.json"} <= set(files)

    scripted = torch.jit.load(io.BytesIO(files["student.pt"]))
    with torch.no_grad():
        ts_logits = scripted(torch.from_numpy(x_val)).numpy()
    assert _accuracy(ts_logits, y_val) == pytest.approx(reported, abs=1e-9)

    import onnxruntime as ort

    session = ort.InferenceSession(files["student.onnx"], providers=["CPUExecutionProvider"])
    (onnx_logits,) = session.run(None, {session.get_inputs()[0].name: x_val})
    assert _accuracy(onnx_logits, y_val) == pytest.approx(reported, abs=1.5 / len(y_val))

    from safetensors.torch import load

    from core.distill.architectures import build_architecture

    arch = json.loads(files["student.arch.json"])
    student = build_architecture(arch["name"], arch["config"]).eval()
    student.load_state_dict(load(files["student.safetensors"]))
    with torch.no_grad():
        st_logits = student(torch.from_numpy(x_val)).numpy()
    assert _accuracy(st_logits, y_val) == pytest.approx(reported, abs=1e-9)

    report = json.loads(files["report.json"])
    assert report["result"]["student"]["accuracy"] == reported


def test_only_teacher_and_dataset_give_a_student_near_the_teacher(
    service: Service, tmp_path: Path
) -> None:
    """wine with a scikit-learn pipeline teacher: the recipe's choices show in the job as
    {"auto": …}, and the downloaded student, on raw inputs, is as good as the teacher (on
    both stacks: nothing of the recipe may depend on the database or the broker)."""
    from tests.core.test_recipe import wine

    data, teacher_file, _ = wine(tmp_path)
    np.savez(tmp_path / "wine.npz", x=data["x"], y=data["y"])
    teacher = service.upload("/v1/models", teacher_file, name="wine-logreg")
    dataset = service.upload("/v1/datasets", tmp_path / "wine.npz", name="wine")
    spec = {"teacher": {"model_id": teacher["id"]}, "dataset_id": dataset["id"]}
    r = service.http.post("/v1/jobs", json=spec)
    assert r.status_code == 201, r.text
    submitted = r.json()["spec"]
    assert set(submitted["training"]["batch_size"]) == {"auto"}
    assert submitted["training"]["lr"] == "auto"
    job = service.wait(r.json()["id"], {"succeeded", "failed", "cancelled"}, timeout=120)
    assert job["status"] == "succeeded", job["error"]
    result = job["result"]
    assert result["spec"]["training"]["lr"] == {"auto": result["recipe"]["chosen"]["training.lr"]}
    assert result["student"]["parameters"] <= result["teacher"]["parameters"]

    import onnxruntime as ort

    files = _download_all(service, job["id"])
    session = ort.InferenceSession(files["student.onnx"], providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: data["x_test"]})
    assert _accuracy(logits, data["y_test"]) >= 0.95


def test_cancel_a_running_job(service: Service, uploads: dict[str, Any]) -> None:
    spec = _spec(uploads["exported_program"]["id"], uploads["dataset"]["id"], epochs=500)
    spec["training"]["early_stopping_patience"] = None
    job_id = service.http.post("/v1/jobs", json=spec).json()["id"]
    deadline = time.monotonic() + 90
    while not any(e["type"] == "metrics" for e in service.events(job_id)):
        assert time.monotonic() < deadline, service.log_tail()
        time.sleep(0.2)
    asked = time.monotonic()
    r = service.http.post(f"/v1/jobs/{job_id}/cancel")
    assert r.status_code == 200 and r.json()["status"] in ("cancelling", "cancelled")
    job = service.wait(job_id, {"cancelled", "failed", "succeeded"}, timeout=30)
    took = time.monotonic() - asked
    assert job["status"] == "cancelled" and took < 5, (job["status"], took)
    assert service.http.get(f"/v1/jobs/{job_id}/artifacts").json()["data"] == []
    # Idempotent.
    assert service.http.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"


def _download_all(service: Service, job_id: str) -> dict[str, bytes]:
    import hashlib

    files: dict[str, bytes] = {}
    for art in service.http.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]:
        r = service.http.get(f"/v1/artifacts/{art['id']}/content")
        assert r.status_code == 200, r.text
        assert len(r.content) == art["size_bytes"]
        assert hashlib.sha256(r.content).hexdigest() == art["sha256"]
        files[art["name"]] = r.content
    return files


def _accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((np.asarray(logits).argmax(1) == y).mean())
