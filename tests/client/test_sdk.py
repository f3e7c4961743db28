"""The SDK against a real API (uvicorn, auth on, SQLite) and a real worker: every method."""

from __future__ import annotations

import hashlib
import pickle
import re
import time
import tracemalloc
from pathlib import Path
from typing import Any

import httpx
import pytest

from client import errors
from client.sdk import Client, Job
from core.spec import parse_spec
from tests.client.conftest import Service, tiny_spec

pytestmark = [pytest.mark.service, pytest.mark.slow]


def test_health_ready_and_auth(service: Service) -> None:
    with service.client() as client:
        assert client.health() == {"status": "ok"}
        assert client.ready()["status"] == "ready"
    with service.client(key="dk_wrong") as client, pytest.raises(errors.Unauthorized) as info:
        client.models.list()
    assert info.value.status == 401 and info.value.code == "unauthorized"
    with Client("http://127.0.0.1:1") as nowhere, pytest.raises(errors.ServiceUnreachable) as down:
        nowhere.health()
    assert "distill serve" in down.value.message


def test_models(service: Service, uploaded: dict[str, Any], tmp_path: Path) -> None:
    teacher = uploaded["teacher"]
    assert teacher.id.startswith("mdl_") and teacher.format == "exported_program"
    assert teacher.signature["outputs"][0]["shape"] == [None, 10]
    assert teacher.sha256 == hashlib.sha256(uploaded["teacher_path"].read_bytes()).hexdigest()
    with service.client() as client:
        assert client.models.get(teacher.id) == teacher
        copy = client.models.upload(uploaded["teacher_path"], name="copy")
        assert copy.name == "copy" and copy.id != teacher.id
        assert [m.id for m in client.models.list(limit=1)] == [copy.id]
        assert {teacher.id, copy.id} <= {m.id for m in client.models.iter(page_size=1)}
        assert client.models.delete(copy.id) == {"id": copy.id, "deleted": True}
        with pytest.raises(errors.NotFound) as info:
            client.models.get(copy.id)
        assert info.value.status == 404
        pickled = tmp_path / "model.pt"
        pickled.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
        with pytest.raises(errors.DistillAPIError) as bad:
            client.models.upload(pickled)
        assert bad.value.status == 422
        assert bad.value.code in ("unsafe_model_file", "model_invalid"), bad.value
        assert type(bad.value) is errors.ERRORS_BY_CODE[bad.value.code]


def test_datasets(service: Service, uploaded: dict[str, Any], tmp_path: Path) -> None:
    dataset = uploaded["dataset"]
    assert dataset.n_samples == 300 and dataset.x_shape == [None, 1, 8, 8]
    assert dataset.has_labels and dataset.n_classes == 10
    with service.client() as client:
        assert client.datasets.get(dataset.id) == dataset
        second = client.datasets.upload(uploaded["data_path"], name="again")
        assert [d.id for d in client.datasets.list(limit=1)] == [second.id]
        assert {dataset.id, second.id} <= {d.id for d in client.datasets.iter(page_size=1)}
        assert client.datasets.delete(second.id)["deleted"] is True
        with pytest.raises(errors.NotFound):
            client.datasets.delete(second.id)


def test_upload_streams_from_disk(service: Service, tmp_path: Path) -> None:
    """A 48 MB upload does not pass through the client's memory (it is rejected as invalid)."""
    big = tmp_path / "junk.npz"
    with big.open("wb") as f:
        for _ in range(48):
            f.write(b"\0" * (1 << 20))
    tracemalloc.start()
    try:
        with service.client() as client, pytest.raises(errors.DatasetInvalid) as info:
            client.datasets.upload(big)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.status == 422
    assert peak < 8 * 2**20, f"peak {peak / 2**20:.1f} MiB while uploading 48 MiB"


def test_job_create_validation_and_idempotency(service: Service, uploaded: dict[str, Any]) -> None:
    spec = tiny_spec(uploaded["teacher"].id, uploaded["dataset"].id)
    with service.client() as client:
        bad = {**spec, "training": {**spec["training"], "epochs": 0}}
        with pytest.raises(errors.InvalidSpec) as info:
            client.jobs.create(bad)
        assert info.value.field == "training.epochs" and info.value.status == 422

        first = client.jobs.create(spec, idempotency_key="sdk-key-1")
        again = client.jobs.create(spec, idempotency_key="sdk-key-1")
        assert again.id == first.id
        with pytest.raises(errors.Conflict) as clash:
            client.jobs.create({**spec, "name": "other"}, idempotency_key="sdk-key-1")
        assert clash.value.details["job_id"] == first.id

        # A JobSpec object is sent as the fields it was given.
        typed = client.jobs.create(parse_spec(spec))
        assert typed.spec["student"]["width"] == 16 and typed.id != first.id
        for job in (first, typed):
            assert job.wait(progress=False, timeout=180).status == "succeeded"


def test_job_reads(service: Service, finished_job: Job) -> None:
    with service.client() as client:
        job = client.jobs.get(finished_job.id)
        assert job.status == "succeeded" and job.done and job.result is not None
        assert job.raise_for_status() is job
        assert finished_job.id in {j.id for j in client.jobs.list(status="succeeded", limit=100)}
        assert finished_job.id not in {j.id for j in client.jobs.list(status="failed")}
        every = [j.id for j in client.jobs.iter(page_size=1)]
        assert every == [j.id for j in client.jobs.list(limit=100)] and len(every) >= 1

        events = list(client.jobs.iter_events(job.id))
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        statuses = [e.data["status"] for e in events if e.type == "status"]
        assert statuses == ["queued", "running", "succeeded"]
        epochs = [e.data.get("epoch") for e in events if e.type == "metrics"]
        assert epochs == [1, 2, None]  # then the delivered student's figures
        page = client.jobs.events(job.id, after=1, limit=2)
        assert [e.seq for e in page] == [2, 3] and page.has_more
        streamed = list(client.jobs.stream_events(job.id))
        assert [e.seq for e in streamed] == [e.seq for e in events]
        assert [e.seq for e in client.jobs.stream_events(job.id, after=2)][0] == 3


def test_artifacts_download_verify_and_resume(
    service: Service, finished_job: Job, tmp_path: Path
) -> None:
    with service.client() as client:
        artifacts = {a.name: a for a in client.jobs.artifacts(finished_job.id)}
        assert {"student.pt", "student.safetensors", "report.json"} <= set(artifacts)
        art = artifacts["student.pt"]
        assert client.artifacts.get(art.id) == art and art.job_id == finished_job.id

        path = client.artifacts.download(art.id, tmp_path)  # a folder: the artifact's name
        data = path.read_bytes()
        assert path == tmp_path / "student.pt" and len(data) == art.size_bytes
        assert hashlib.sha256(data).hexdigest() == art.sha256

        # A partial file is continued with a Range request (the API answers 206).
        before = _ranged_downloads(client)
        target = tmp_path / "resumed.pt"
        target.with_name("resumed.pt.part").write_bytes(data[: len(data) // 2])
        assert client.artifacts.download(art.id, target).read_bytes() == data
        # (the server counts a request once its response has ended: allow it a moment)
        deadline = time.monotonic() + 5
        while _ranged_downloads(client) < before + 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _ranged_downloads(client) == before + 1
        assert not target.with_name("resumed.pt.part").exists()

        # A partial file that is not a prefix of the artifact fails the checksum and is removed.
        broken = tmp_path / "broken.pt"
        part = broken.with_name("broken.pt.part")
        part.write_bytes(b"x" * 100)
        with pytest.raises(errors.ChecksumMismatch):
            client.artifacts.download(art.id, broken)
        assert not part.exists() and not broken.exists()
        assert client.artifacts.download(art.id, broken).read_bytes() == data


def _ranged_downloads(client: Client) -> float:
    text = client.http.get("/metrics").text
    pattern = r'distill_http_requests_total\{[^}]*route="/v1/artifacts/\{artifact_id\}/content"'
    pattern += r'[^}]*status="206"[^}]*\} (\S+)'
    match = re.search(pattern, text)
    return float(match.group(1)) if match else 0.0


def test_cancel_conflict_wait_and_progress(
    service: Service, uploaded: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tiny_spec(
        uploaded["teacher"].id, uploaded["dataset"].id, epochs=500, early_stopping_patience=None
    )
    with service.client() as client:
        job = client.jobs.create(spec)
        with pytest.raises(errors.Conflict) as busy:
            client.models.delete(uploaded["teacher"].id)
        assert busy.value.status == 409
        deadline = time.monotonic() + 90
        while not any(e.type == "metrics" for e in job.events()):
            assert time.monotonic() < deadline, service.logs()
            time.sleep(0.2)
        with pytest.raises(TimeoutError):
            job.wait(progress=False, timeout=0.3)
        assert job.cancel().status in ("cancelling", "cancelled")
        final = job.wait(progress=True, timeout=60)
    assert final.status == "cancelled"
    with pytest.raises(errors.JobFailed) as failed:
        final.raise_for_status()
    assert failed.value.code == "cancelled" and failed.value.job is final
    shown = capsys.readouterr().err
    assert "status: running" in shown and "status: cancelled" in shown
    assert "loss" in shown  # the bar showed the epoch's metrics


def test_errors_from_any_body() -> None:
    """A non-envelope error answer (a proxy's HTML page) still becomes a typed error."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(502, text="<html>Bad Gateway</html>")

    client = Client("http://proxy", transport=httpx.MockTransport(handler))
    with client, pytest.raises(errors.ServerError) as info:
        client.jobs.get("job_x")
    assert info.value.status == 502 and "Bad Gateway" in info.value.message
