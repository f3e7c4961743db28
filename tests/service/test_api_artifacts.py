"""Artifact downloads: listing, metadata, ETag / If-None-Match, single Range requests, 416."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from api.routes.artifacts import parse_range
from core.errors import RangeNotSatisfiable
from tests.service.api_support import Api, Tenant, build_api, insert_artifact, insert_job
from tests.service.helpers import migrate

DATA = os.urandom(3 * 1024 * 1024 + 123)  # spans several storage chunks


@pytest.fixture
def api(tmp_path: Path) -> Api:
    url = f"sqlite:///{tmp_path / 'distill.db'}"
    migrate(url)
    return build_api(url, tmp_path)


@pytest.fixture
def owned(api: Api) -> tuple[Tenant, str, str]:
    tenant = api.tenant()
    with api.session() as s:
        job = insert_job(s, tenant.id, status="succeeded")
        art = insert_artifact(s, api.storage, job, DATA, name="student.onnx")
        insert_artifact(s, api.storage, job, b'{"ok": true}', name="report.json")
    return tenant, job.id, art.id


def test_list_and_metadata(api: Api, owned: tuple[Tenant, str, str]) -> None:
    tenant, job_id, art_id = owned
    listed = api.client.get(f"/v1/jobs/{job_id}/artifacts", headers=tenant.headers).json()
    assert [a["name"] for a in listed["data"]] == ["report.json", "student.onnx"]
    meta = api.client.get(f"/v1/artifacts/{art_id}", headers=tenant.headers).json()
    assert meta["size_bytes"] == len(DATA)
    assert meta["sha256"] == hashlib.sha256(DATA).hexdigest()
    assert meta["job_id"] == job_id and meta["kind"] == "student_onnx"


def test_full_download_with_headers(api: Api, owned: tuple[Tenant, str, str]) -> None:
    tenant, _, art_id = owned
    r = api.client.get(f"/v1/artifacts/{art_id}/content", headers=tenant.headers)
    assert r.status_code == 200
    assert r.content == DATA
    assert r.headers["etag"] == f'"{hashlib.sha256(DATA).hexdigest()}"'
    assert r.headers["content-length"] == str(len(DATA))
    assert r.headers["accept-ranges"] == "bytes"
    assert r.headers["content-disposition"] == 'attachment; filename="student.onnx"'

    cached = api.client.get(
        f"/v1/artifacts/{art_id}/content",
        headers={**tenant.headers, "If-None-Match": r.headers["etag"]},
    )
    assert cached.status_code == 304 and cached.content == b""
    stale = api.client.get(
        f"/v1/artifacts/{art_id}/content", headers={**tenant.headers, "If-None-Match": '"abc"'}
    )
    assert stale.status_code == 200 and stale.content == DATA


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [
        ("bytes=0-99", 0, 100),
        ("bytes=1048570-1048580", 1048570, 1048581),  # across a chunk boundary
        ("bytes=3145000-", 3145000, len(DATA)),
        ("bytes=-500", len(DATA) - 500, len(DATA)),
        (f"bytes=10-{len(DATA) + 1000}", 10, len(DATA)),  # the end is clamped
    ],
)
def test_range_requests(
    api: Api, owned: tuple[Tenant, str, str], header: str, start: int, end: int
) -> None:
    tenant, _, art_id = owned
    r = api.client.get(
        f"/v1/artifacts/{art_id}/content", headers={**tenant.headers, "Range": header}
    )
    assert r.status_code == 206
    assert r.content == DATA[start:end]
    assert r.headers["content-range"] == f"bytes {start}-{end - 1}/{len(DATA)}"
    assert r.headers["content-length"] == str(end - start)


def test_unsatisfiable_range_is_416(api: Api, owned: tuple[Tenant, str, str]) -> None:
    tenant, _, art_id = owned
    r = api.client.get(
        f"/v1/artifacts/{art_id}/content",
        headers={**tenant.headers, "Range": f"bytes={len(DATA)}-"},
    )
    assert r.status_code == 416
    assert r.headers["content-range"] == f"bytes */{len(DATA)}"
    assert r.json()["error"]["code"] == "range_not_satisfiable"


def test_if_range_with_an_old_etag_sends_everything(
    api: Api, owned: tuple[Tenant, str, str]
) -> None:
    tenant, _, art_id = owned
    r = api.client.get(
        f"/v1/artifacts/{art_id}/content",
        headers={**tenant.headers, "Range": "bytes=0-9", "If-Range": '"old"'},
    )
    assert r.status_code == 200 and r.content == DATA


def test_parse_range_ignores_what_it_cannot_serve() -> None:
    assert parse_range("bytes=0-1,5-6", 100) is None  # multi-range: whole file
    assert parse_range("items=0-1", 100) is None
    assert parse_range("bytes=5-2", 100) is None
    assert parse_range("bytes=abc", 100) is None
    with pytest.raises(RangeNotSatisfiable):
        parse_range("bytes=-0", 100)
    with pytest.raises(RangeNotSatisfiable):
        parse_range("bytes=0-", 0)
