"""Uploads over HTTP: streamed to storage, inspected in the sandbox, limits, refusals, memory."""

from __future__ import annotations

import hashlib
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import torch
from torch import nn

from tests.core.model_files import save_exported_program
from tests.service.api_support import Api, build_api
from tests.service.helpers import migrate, service_env, start_api


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.fixture
def api(tmp_path: Path) -> Api:
    url = f"sqlite:///{tmp_path / 'distill.db'}"
    migrate(url)
    return build_api(url, tmp_path)


def _blobs(api: Api) -> list[Path]:
    root = Path(api.storage.root)  # type: ignore[attr-defined]
    return [p for p in root.rglob("*") if p.is_file()]


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@pytest.mark.slow
def test_upload_exported_program_records_its_signature(api: Api, tmp_path: Path) -> None:
    tenant = api.tenant()
    torch.manual_seed(0)
    path = save_exported_program(Tiny(), tmp_path / "tiny.pt2", torch.randn(2, 1, 8, 8))
    data = path.read_bytes()
    r = api.client.post(
        "/v1/models",
        files={"file": ("tiny.pt2", data)},
        data={"name": "tiny-teacher"},
        headers=tenant.headers,
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["id"].startswith("mdl_") and body["name"] == "tiny-teacher"
    assert body["format"] == "exported_program"
    assert body["size_bytes"] == len(data)
    assert body["sha256"] == hashlib.sha256(data).hexdigest()
    assert body["parameters"] == 64 * 16 + 16 + 16 * 10 + 10
    assert body["signature"]["inputs"] == [{"shape": [None, 1, 8, 8], "dtype": "float32"}]
    assert body["signature"]["outputs"] == [{"shape": [None, 10], "dtype": "float32"}]
    assert body["created_at"].endswith("Z")
    # The stored bytes are the uploaded bytes.
    assert [p.read_bytes() for p in _blobs(api)] == [data]
    listed = api.client.get("/v1/models", headers=tenant.headers).json()
    assert [m["id"] for m in listed["data"]] == [body["id"]]
    assert api.client.get(f"/v1/models/{body['id']}", headers=tenant.headers).json() == body


def test_pickled_model_is_refused_and_not_kept(api: Api, tmp_path: Path) -> None:
    tenant = api.tenant()
    buf = io.BytesIO()
    torch.save(Tiny(), buf)  # a full pickle of the module: must never be loaded
    r = api.client.post(
        "/v1/models", files={"file": ("model.pt", buf.getvalue())}, headers=tenant.headers
    )
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "unsafe_model_file"
    assert "export" in error["message"].lower()
    assert _blobs(api) == []
    assert api.client.get("/v1/models", headers=tenant.headers).json()["data"] == []


def test_upload_npz_dataset(api: Api, digits: dict[str, np.ndarray]) -> None:
    tenant = api.tenant()
    data = _npz(x=digits["x_train"][:100], y=digits["y_train"][:100])
    r = api.client.post(
        "/v1/datasets",
        files={"file": ("digits.npz", data)},
        headers=tenant.headers,
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["id"].startswith("ds_") and body["name"] == "digits"
    assert body["format"] == "npz"
    assert body["n_samples"] == 100
    assert body["x_shape"] == [None, 1, 8, 8] and body["x_dtype"] == "float32"
    assert body["has_labels"] is True and body["n_classes"] == 10
    assert body["size_bytes"] == len(data)


def test_malformed_dataset_is_refused_naming_the_problem(api: Api) -> None:
    tenant = api.tenant()
    r = api.client.post(
        "/v1/datasets",
        files={"file": ("bad.npz", _npz(features=np.zeros((4, 3), np.float32)))},
        headers=tenant.headers,
    )
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "dataset_invalid" and "x" in error["message"]
    assert _blobs(api) == []


def test_upload_over_the_limit_is_413_with_and_without_content_length(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'distill.db'}"
    migrate(url)
    api = build_api(url, tmp_path, max_upload_bytes=10_000)
    tenant = api.tenant()
    payload = b"x" * 50_000

    # With Content-Length: the stream is cut once the file passes the limit.
    r = api.client.post("/v1/models", files={"file": ("big.pt2", payload)}, headers=tenant.headers)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    assert r.json()["error"]["details"]["max_bytes"] == 10_000

    # Chunked, no Content-Length: the same limit while streaming.
    boundary = "b0undary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.npz"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()

    def body() -> Iterator[bytes]:
        yield head
        for _ in range(10):
            yield b"y" * 5_000
        yield f"\r\n--{boundary}--\r\n".encode()

    r = api.client.post(
        "/v1/datasets",
        content=body(),
        headers={**tenant.headers, "Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"

    # A declared length far over the limit is refused before reading the body.
    big = b"z" * (2 * 1024 * 1024)
    r = api.client.post("/v1/models", files={"file": ("huge.pt2", big)}, headers=tenant.headers)
    assert r.status_code == 413
    assert _blobs(api) == []


@pytest.mark.parametrize(
    ("form", "field"),
    [
        ({"arch": "{not json"}, "arch"),
        ({"format": "pickle"}, "format"),
        ({"input_shape": "[3, -1]"}, "input_shape"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_bad_form_fields_are_named(api: Api, form: dict[str, str], field: str) -> None:
    tenant = api.tenant()
    r = api.client.post(
        "/v1/models", files={"file": ("m.pt2", b"\0" * 10)}, data=form, headers=tenant.headers
    )
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_request"
    assert r.json()["error"]["details"]["field"] == field
    assert _blobs(api) == []


def test_upload_without_a_file_part(api: Api) -> None:
    tenant = api.tenant()
    r = api.client.post("/v1/models", data={"name": "x"}, headers=tenant.headers)
    assert r.status_code == 422 and r.json()["error"]["details"]["field"] == "file"
    # A multipart form with text fields only: the fields received are named.
    r = api.client.post("/v1/models", files={"name": (None, "x")}, headers=tenant.headers)
    assert r.status_code == 422 and r.json()["error"]["details"]["field"] == "file"
    assert "fields received: 'name'" in r.json()["error"]["message"]
    r = api.client.post("/v1/models", json={"file": "x"}, headers=tenant.headers)
    assert r.status_code == 422 and "multipart" in r.json()["error"]["message"]


@pytest.mark.parametrize("route", ["/v1/models", "/v1/datasets"])
def test_a_file_in_the_wrong_field_names_the_field_expected_and_the_one_received(
    api: Api, route: str
) -> None:
    # curl -F data=@digits.npz: a file larger than any text field, under another name.
    tenant = api.tenant()
    big = _npz(x=np.zeros((300, 64), np.float32))
    assert len(big) > 64 * 1024
    r = api.client.post(
        route, files={"data": ("digits.npz", big)}, data={"name": "x"}, headers=tenant.headers
    )
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["details"]["field"] == "file" and error["details"]["received"] == "data"
    assert "no 'file' field" in error["message"] and "'data'" in error["message"]
    assert "longer than" not in error["message"]
    assert _blobs(api) == []


@pytest.mark.slow
def test_api_memory_stays_flat_while_streaming_a_large_upload(tmp_path: Path) -> None:
    """200 MiB through a real uvicorn process: its RSS must not grow with the file."""
    url = f"sqlite:///{tmp_path / 'distill.db'}"
    migrate(url)
    env = service_env(auth="off", data_dir=str(tmp_path / "data"), database_url=url)
    proc, base = start_api(env, tmp_path)
    try:
        server = psutil.Process(proc.popen.pid)
        boundary = "memtest"

        def body(mib: int) -> Iterator[bytes]:
            yield (
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
                'filename="big.bin"\r\n\r\n'
            ).encode()
            chunk = b"\x07" * (1024 * 1024)
            for _ in range(mib):
                yield chunk
            yield f"\r\n--{boundary}--\r\n".encode()

        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        with httpx.Client(base_url=base, timeout=300) as client:
            # Warm up every code path of an upload (it fails inspection: not a model).
            warm = client.post("/v1/models", content=body(4), headers=headers)
            assert warm.status_code == 422, warm.text
            baseline = server.memory_info().rss
            peak = baseline
            done = threading.Event()

            def sample() -> None:
                nonlocal peak
                while not done.is_set():
                    peak = max(peak, server.memory_info().rss)
                    time.sleep(0.02)

            sampler = threading.Thread(target=sample)
            sampler.start()
            size_mib = 200
            try:
                r = client.post("/v1/models", content=body(size_mib), headers=headers)
            finally:
                done.set()
                sampler.join()
        assert r.status_code == 422 and r.json()["error"]["code"] == "model_invalid", r.text
        growth_mib = (peak - baseline) / 2**20
        assert growth_mib / size_mib < 0.1, f"RSS grew {growth_mib:.1f} MiB for {size_mib} MiB"
        # The rejected upload left nothing behind.
        blobs = tmp_path / "data" / "blobs"
        assert not [p for p in blobs.rglob("*") if p.is_file()]
    finally:
        proc.stop()
