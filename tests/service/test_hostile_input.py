"""Hostile input through a real API process: each refused clearly, nothing run, nothing kept.

The engine-level checks live beside the engine (tests/core/test_formats.py, test_data.py,
test_sandbox.py, test_spec.py). Over HTTP already, in tests/service: the upload size limit
with and without Content-Length (test_api_uploads.py::
test_upload_over_the_limit_is_413_with_and_without_content_length) and idempotent submission
(test_api_jobs.py::test_idempotency_key_returns_the_first_job).
Here every item goes through HTTP once, and afterwards storage and the tables hold nothing new.
"""

from __future__ import annotations

import io
import stat
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest
import torch
from PIL import Image
from torch import nn

from tests.core.model_files import (
    save_malicious_pickle,
    save_malicious_torch_save,
    save_onnx,
    save_safetensors,
    save_torchscript,
)
from tests.service.api_support import build_api, insert_artifact, insert_job
from tests.service.helpers import Proc, migrate, service_env, start_api

pytestmark = pytest.mark.service


@dataclass
class Service:
    proc: Proc
    http: httpx.Client
    blobs: Path
    files: dict[str, Path]
    marker: Path
    ids: dict[str, str]

    def stored(self) -> set[Path]:
        return {p for p in self.blobs.rglob("*") if p.is_file()} if self.blobs.exists() else set()

    def counts(self) -> dict[str, int]:
        return {
            kind: len(self.http.get(f"/v1/{kind}", params={"limit": 100}).json()["data"])
            for kind in ("models", "datasets", "jobs")
        }


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()


def _zip(path: Path, entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for info, data in entries:
            zf.writestr(info, data)
    return path


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, format="PNG")
    return buf.getvalue()


def _write_files(folder: Path, marker: Path) -> dict[str, Path]:
    """Every hostile file, and the honest ones the job cases need."""
    import onnx

    model = _tiny()
    example = torch.zeros(2, 1, 8, 8)
    files = {
        "teacher": save_torchscript(model, folder / "teacher.pt", example),
        "pickle": save_malicious_pickle(folder / "model.pkl", marker),
        "torch_save": save_malicious_torch_save(folder / "model.pt", marker),
    }
    onnx_path = save_onnx(model, folder / "ok.onnx", example)
    proto = onnx.load(str(onnx_path))
    tensor = proto.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="../../../../etc/passwd")
    files["onnx_outside"] = folder / "escape.onnx"
    files["onnx_outside"].write_bytes(proto.SerializeToString())

    safetensors = save_safetensors(model, folder / "full.safetensors", "mlp", {})
    files["truncated"] = folder / "truncated.safetensors"
    files["truncated"].write_bytes(safetensors.read_bytes()[:-100])
    files["truncated_torchscript"] = folder / "truncated.pt"
    files["truncated_torchscript"].write_bytes(files["teacher"].read_bytes()[:400])
    files["random"] = folder / "random.pt2"
    files["random"].write_bytes(np.random.default_rng(0).bytes(4096))

    png = _png(8, 8)
    files["zip_dotdot"] = _zip(folder / "dotdot.zip", [("../evil/a.png", png)])
    files["zip_absolute"] = _zip(folder / "absolute.zip", [("/tmp/evil/a.png", png)])
    link = zipfile.ZipInfo("cats/link.png")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    files["zip_symlink"] = _zip(folder / "symlink.zip", [(link, b"/etc/passwd")])
    # 6000 x 6000 pixels (36 M, over the 16.7 M limit) in a file of a few kB.
    files["pixel_bomb"] = _zip(folder / "bomb.zip", [("cats/a.png", _png(6000, 6000))])

    x = np.random.default_rng(0).random((60, 1, 8, 8), dtype=np.float32)
    y = np.arange(60) % 10
    nan_x = x.copy()
    nan_x[3, 0, 2, 2] = np.nan
    np.savez(folder / "nan.npz", x=nan_x, y=y)
    np.savez(folder / "twelve.npz", x=x, y=np.arange(60) % 12)
    np.savez(folder / "digits.npz", x=x, y=y)
    files.update(nan=folder / "nan.npz", twelve=folder / "twelve.npz", digits=folder / "digits.npz")
    return files


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("hostile")
    url = f"sqlite:///{tmp / 'distill.db'}"
    migrate(url)
    blobs = tmp / "blobs"
    env = service_env(
        auth="off", data_dir=str(tmp / "data"), database_url=url, storage_url=f"file://{blobs}"
    )
    marker = tmp / "unpickled-marker"
    files = _write_files(tmp, marker)
    proc, base = start_api(env, tmp)
    http = httpx.Client(base_url=base, timeout=120)
    try:
        service = Service(proc, http, blobs, files, marker, {})
        service.ids["teacher"] = _upload(service, "models", "teacher", input_shape="[1, 8, 8]")
        service.ids["digits"] = _upload(service, "datasets", "digits")
        service.ids["twelve"] = _upload(service, "datasets", "twelve")
        yield service
    finally:
        http.close()
        proc.stop()


def _post_file(service: Service, kind: str, name: str, **fields: str) -> httpx.Response:
    path = service.files[name]
    with path.open("rb") as f:
        return service.http.post(f"/v1/{kind}", files={"file": (path.name, f)}, data=fields)


def _upload(service: Service, kind: str, name: str, **fields: str) -> str:
    r = _post_file(service, kind, name, **fields)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _job(changes: dict[str, Any]) -> Callable[[Service], httpx.Response]:
    def post(service: Service) -> httpx.Response:
        spec: dict[str, Any] = {
            "teacher": {"model_id": service.ids["teacher"]},
            "dataset_id": service.ids[changes.pop("dataset", "digits")],
            **changes,
        }
        return service.http.post("/v1/jobs", json=spec)

    return post


def _file(kind: str, name: str, **fields: str) -> Callable[[Service], httpx.Response]:
    return lambda service: _post_file(service, kind, name, **fields)


# (what is sent, HTTP status, error code, words the message must contain)
CASES: dict[str, tuple[Callable[[Service], httpx.Response], int, str, str]] = {
    "pickle": (_file("models", "pickle"), 422, "unsafe_model_file", "pickle"),
    "torch.save pickle": (_file("models", "torch_save"), 422, "unsafe_model_file", "pickle"),
    "onnx external data outside": (
        _file("models", "onnx_outside"),
        422,
        "model_invalid",
        "outside the model's folder",
    ),
    "truncated safetensors": (_file("models", "truncated"), 422, "model_invalid", "safetensors"),
    "truncated torchscript": (
        _file("models", "truncated_torchscript", input_shape="[1, 8, 8]"),
        422,
        "model_invalid",
        "",
    ),
    "random bytes": (
        _file("models", "random"),
        422,
        "model_invalid",
        "not a model this service reads",
    ),
    "zip with ../": (_file("datasets", "zip_dotdot"), 422, "dataset_invalid", "escapes its folder"),
    "zip with absolute path": (
        _file("datasets", "zip_absolute"),
        422,
        "dataset_invalid",
        "escapes its folder",
    ),
    "zip with symlink": (_file("datasets", "zip_symlink"), 422, "dataset_invalid", "symbolic link"),
    "image decompression bomb": (_file("datasets", "pixel_bomb"), 422, "dataset_invalid", "pixels"),
    "NaN in x": (_file("datasets", "nan"), 422, "dataset_invalid", "NaN"),
    "12 labels, 10 teacher outputs": (
        _job({"dataset": "twelve"}),
        422,
        "shape_mismatch",
        "12 classes",
    ),
    "10^9 epochs": (_job({"training": {"epochs": 10**9}}), 422, "invalid_spec", "epochs"),
    "batch larger than the data": (
        _job({"training": {"batch_size": 4096}}),
        422,
        "invalid_spec",
        "batch_size",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_input_is_refused_and_leaves_nothing(service: Service, case: str) -> None:
    send, status, code, words = CASES[case]
    stored, counts = service.stored(), service.counts()
    r = send(service)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code, error
    assert words.lower() in error["message"].lower(), error["message"]
    assert service.stored() == stored  # nothing new in storage
    assert service.counts() == counts  # and no row
    assert not service.marker.exists()  # nothing was unpickled, anywhere


def test_uploaded_models_are_opened_only_in_the_sandbox(service: Service) -> None:
    """The API process never loaded torch: every file was opened in a child process."""
    assert service.ids["teacher"].startswith("mdl_")  # a TorchScript file was opened
    maps = [m.path for m in psutil.Process(service.proc.popen.pid).memory_maps()]
    assert maps and not [p for p in maps if "libtorch" in p], "the API process loaded torch"


def test_event_stream_and_ranged_download_are_404_for_another_tenant(tmp_path: Path) -> None:
    """Adds to test_api_auth.py's list: the live event stream and a Range download."""
    url = f"sqlite:///{tmp_path / 'distill.db'}"
    migrate(url)
    api = build_api(url, tmp_path)
    owner, stranger = api.tenant(), api.tenant()
    with api.session() as s:
        job = insert_job(s, owner.id, status="succeeded")
        artifact = insert_artifact(s, api.storage, job, b"student bytes")
    stream = {"Accept": "text/event-stream"}
    r = api.client.get(f"/v1/jobs/{job.id}/events", headers={**stranger.headers, **stream})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    ranged = {"Range": "bytes=0-3"}
    r = api.client.get(
        f"/v1/artifacts/{artifact.id}/content", headers={**stranger.headers, **ranged}
    )
    assert r.status_code == 404 and b"stud" not in r.content
    r = api.client.get(f"/v1/artifacts/{artifact.id}/content", headers={**owner.headers, **ranged})
    assert r.status_code == 206 and r.content == b"stud"
