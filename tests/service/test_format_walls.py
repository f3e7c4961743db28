"""The format checks (the second wall) through a real API process and a real worker.

Each hostile model file here does harm when opened with plain torch (tests/core/test_formats.py
and test_operators.py prove it); uploaded, it is refused with a 422 naming what was refused,
nothing of a read file comes back, a targeted file keeps its bytes, a pickle marker never
appears, and nothing is stored. A model stored before the checks existed is refused again when
a job loads it as its teacher.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
import torch

from cli.digits import DigitsCNN
from tests.core.model_files import (
    save_duplicate_config_attack,
    save_exported_file_reader,
    save_exported_program,
    save_file_reader,
    save_file_writer,
    save_load_time_writer,
    save_shape_expression_attack,
    save_torchscript,
)
from tests.service.helpers import Proc, migrate, service_env, start_api, start_worker

pytestmark = pytest.mark.service

PASSWD = Path("/etc/passwd")
TARGET_BYTES = b"bytes that must stay as they are\n"


@dataclass
class Service:
    proc: Proc
    http: httpx.Client
    env: dict[str, str]
    tmp: Path
    blobs: Path
    files: dict[str, Path]
    marker: Path
    target: Path
    secret: bytes

    def stored(self) -> set[Path]:
        return {p for p in self.blobs.rglob("*") if p.is_file()} if self.blobs.exists() else set()


def _sparse_external_onnx(path: Path) -> Path:
    """A one-Add model whose sparse initializer's values point at /etc/passwd."""
    h, T = onnx.helper, onnx.TensorProto
    values = h.make_tensor("W", T.FLOAT, [2], [0.0, 0.0])
    values.ClearField("float_data")
    values.data_location = T.EXTERNAL
    values.external_data.add(key="location", value="../../../../etc/passwd")
    sparse = h.make_sparse_tensor(values, h.make_tensor("i", T.INT64, [2], [0, 3]), [4])
    graph = h.make_graph(
        [h.make_node("Add", ["X", "W"], ["Y"])],
        "g",
        [h.make_tensor_value_info("X", T.FLOAT, [4])],
        [h.make_tensor_value_info("Y", T.FLOAT, [4])],
        sparse_initializer=[sparse],
    )
    path.write_bytes(h.make_model(graph).SerializeToString())
    return path


def _write_files(folder: Path, marker: Path, target: Path) -> dict[str, Path]:
    torch.manual_seed(0)
    model, example = DigitsCNN(width=4).eval(), torch.zeros(2, 1, 8, 8)
    exported = save_exported_program(model, folder / "honest.pt2", example)
    size = min(PASSWD.stat().st_size, 64)
    np.savez(
        folder / "digits.npz",
        x=np.random.default_rng(0).random((40, 1, 8, 8), dtype=np.float32),
        y=np.arange(40) % 10,
    )
    return {
        "honest": save_torchscript(model, folder / "honest.pt", example),
        "digits": folder / "digits.npz",
        "reads_passwd": save_file_reader(folder / "reads.pt", PASSWD, size),
        "writes_target": save_file_writer(folder / "writes.pt", target, 8),
        "writes_on_load": save_load_time_writer(folder / "onload.pt", target, 8),
        "exported_reads": save_exported_file_reader(folder / "reads.pt2", PASSWD),
        "duplicate_config": save_duplicate_config_attack(exported, folder / "dup.pt2", marker),
        "shape_expression": save_shape_expression_attack(exported, folder / "expr.pt2", marker),
        "sparse_onnx": _sparse_external_onnx(folder / "sparse.onnx"),
    }


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("walls")
    url = f"sqlite:///{tmp / 'distill.db'}"
    migrate(url)
    blobs = tmp / "blobs"
    env = service_env(
        auth="off", data_dir=str(tmp / "data"), database_url=url, storage_url=f"file://{blobs}"
    )
    marker, target = tmp / "unpickled-marker", tmp / "outside-the-data-dir.txt"
    files = _write_files(tmp, marker, target)
    target.write_bytes(TARGET_BYTES)
    proc, base = start_api(env, tmp)
    http = httpx.Client(base_url=base, timeout=120)
    secret = PASSWD.read_bytes()[:64]
    try:
        yield Service(proc, http, env, tmp, blobs, files, marker, target, secret)
    finally:
        http.close()
        proc.stop()


def _post(service: Service, name: str, kind: str = "models", **fields: str) -> httpx.Response:
    path = service.files[name]
    with path.open("rb") as f:
        return service.http.post(f"/v1/{kind}", files={"file": (path.name, f)}, data=fields)


def _leaks(service: Service, text: str) -> list[str]:
    """Lines of the read file (any longer than a few characters) found in ``text``."""
    lines = service.secret.decode(errors="replace").splitlines()[:-1]
    return [line for line in lines if len(line) > 6 and line in text]


# (file, code, words the message must hold)
CASES: dict[str, tuple[str, str, str]] = {
    "TorchScript reading /etc/passwd": ("reads_passwd", "unsafe_model_file", "aten::from_file"),
    "TorchScript writing a file": ("writes_target", "unsafe_model_file", "aten::from_file"),
    "TorchScript writing while loading": ("writes_on_load", "unsafe_model_file", "__setstate__"),
    "exported program reading a file": ("exported_reads", "unsafe_model_file", "aten::from_file"),
    "export archive with a duplicate entry": ("duplicate_config", "unsafe_model_file", "twice"),
    "shape expression that is Python": (
        "shape_expression",
        "unsafe_model_file",
        "not a plain sympy expression",
    ),
    "ONNX sparse initializer in another file": (
        "sparse_onnx",
        "model_invalid",
        "outside the model's folder",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_model_files_are_refused_at_upload(service: Service, case: str) -> None:
    name, code, words = CASES[case]
    stored = service.stored()
    r = _post(service, name, input_shape="[1, 8, 8]")
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == code, error
    assert words in error["message"], error["message"]
    if words.startswith("aten::"):
        assert "does not run" in error["message"]
    assert not _leaks(service, r.text)
    assert service.stored() == stored  # nothing kept
    assert service.target.read_bytes() == TARGET_BYTES
    assert not service.marker.exists()
    assert not _leaks(service, service.proc.output())  # nor in the API's log


def _wait_for_job(service: Service, job_id: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = service.http.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not finish: {job}")


@pytest.fixture(scope="module")
def worker(service: Service) -> Iterator[Proc]:
    logs = service.tmp / "worker"
    logs.mkdir()
    proc = start_worker(service.env, logs)
    try:
        yield proc
    finally:
        proc.stop()


@pytest.mark.parametrize("hostile", ["reads_passwd", "writes_target"])
def test_a_stored_hostile_teacher_is_refused_when_a_job_loads_it(
    service: Service, worker: Proc, hostile: str
) -> None:
    """As if stored before the checks existed: an honest upload whose blob is then replaced."""
    before = service.stored()
    teacher = _post(service, "honest", input_shape="[1, 8, 8]")
    assert teacher.status_code == 201, teacher.text
    (blob,) = service.stored() - before
    blob.write_bytes(service.files[hostile].read_bytes())
    dataset = _post(service, "digits", kind="datasets")
    assert dataset.status_code == 201, dataset.text
    spec = {
        "teacher": {"model_id": teacher.json()["id"]},
        "dataset_id": dataset.json()["id"],
        "training": {"epochs": 1, "batch_size": 8},
    }
    r = service.http.post("/v1/jobs", json=spec)
    assert r.status_code == 201, r.text
    job = _wait_for_job(service, r.json()["id"])
    events = service.http.get(f"/v1/jobs/{job['id']}/events").text
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "unsafe_model_file", job["error"]
    assert "aten::from_file" in job["error"]["message"]
    for text in (str(job), events, worker.output(), service.proc.output()):
        assert not _leaks(service, text)
    assert service.target.read_bytes() == TARGET_BYTES
