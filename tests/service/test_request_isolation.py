"""No request can fail another: poisoned specs, deep JSON, out-of-range event cursors and form
floods each get a 4xx of their own, through a real API process (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil
import pytest

from api.uploads import MAX_FORM_BYTES, MAX_FORM_FIELDS
from tests.conftest import POSTGRES_URL, require_service
from tests.service.helpers import fresh_postgres, migrate
from tests.service.real_api import Service, open_database, start_service

pytestmark = pytest.mark.service

# Each poisons the spec of tenant A in a way PostgreSQL's json type or the engine would refuse.
POISONS: dict[str, tuple[str, str]] = {
    "NUL in the name": ('"name": "x\\u0000y"', "name"),
    "NUL in a spec string": ('"export": ["onnx\\u0000"]', "export.0"),
    "overflowing float": ('"training": {"grad_clip": 1e309}', "training.grad_clip"),
    "Infinity": ('"training": {"lr": Infinity}', "training.lr"),
    "NaN": ('"distillation": {"method": "kd", "temperature": NaN}', "distillation.temperature"),
    "lone surrogate": ('"name": "\\ud800"', "name"),
}


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def database(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    with open_database(request.param, tmp_path_factory.mktemp("db")) as url:
        yield url


@pytest.fixture(scope="module")
def service(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    service = start_service(database, tmp_path_factory.mktemp("api"))
    try:
        yield service
    finally:
        service.proc.stop()


def _flood(
    service: Service, poisons: list[str]
) -> tuple[list[httpx.Response], list[httpx.Response]]:
    """Tenant B's 30 valid jobs sent at the same time as tenant A's poisoned ones."""
    with httpx.Client(base_url=service.base, timeout=60) as http, ThreadPoolExecutor(12) as pool:
        # Interleaved, so that the intake's batches mix both tenants' requests.
        sends = []
        for i in range(30):
            sends.append(
                (
                    "b",
                    pool.submit(
                        http.post,
                        "/v1/jobs",
                        content=service.b.body(f'"name": "b{i}"'),
                        headers=service.b.headers,
                    ),
                )
            )
            extra = POISONS[poisons[i % len(poisons)]][0]
            sends.append(
                (
                    "a",
                    pool.submit(
                        http.post,
                        "/v1/jobs",
                        content=service.a.body(extra),
                        headers=service.a.headers,
                    ),
                )
            )
        results = [(who, future.result()) for who, future in sends]
    return [r for who, r in results if who == "a"], [r for who, r in results if who == "b"]


def test_poisoned_specs_are_refused_and_fail_no_one_else(service: Service) -> None:
    before = service.jobs(service.b)
    poisoned, valid = _flood(service, list(POISONS))
    assert [r.status_code for r in valid] == [201] * 30, [
        r.text for r in valid if r.status_code != 201
    ]
    assert service.jobs(service.b) == before + 30
    for i, r in enumerate(poisoned):
        name = list(POISONS)[i % len(POISONS)]
        assert r.status_code == 422, (name, r.text)
        error = r.json()["error"]
        assert error["code"] == "invalid_spec", (name, error)
        assert error["details"]["field"] == POISONS[name][1], (name, error)
    assert service.jobs(service.a) == 0


@pytest.fixture
def unchecked(tmp_path: Path) -> Iterator[Service]:
    require_service("PostgreSQL", "127.0.0.1", 5432)
    with fresh_postgres(POSTGRES_URL) as url:
        migrate(url)
        service = start_service(
            url, tmp_path, factory="tests.service.unchecked_app:create_unchecked_app"
        )
        try:
            yield service
        finally:
            service.proc.stop()


def test_a_value_the_database_refuses_fails_only_its_own_request(unchecked: Service) -> None:
    """Past validation (switched off here), PostgreSQL refuses the poisoned rows of a group
    commit: each request is then taken in on its own, and only tenant A's fail, with a 422."""
    poisoned, valid = _flood(unchecked, ["NUL in the name", "overflowing float", "Infinity"])
    assert [r.status_code for r in valid] == [201] * 30, [
        r.text for r in valid if r.status_code != 201
    ]
    assert unchecked.jobs(unchecked.b) == 30
    assert {r.status_code for r in poisoned} == {422}, [r.text for r in poisoned]
    assert {r.json()["error"]["code"] for r in poisoned} == {"invalid_spec"}
    assert unchecked.jobs(unchecked.a) == 0
    assert "Traceback" not in unchecked.proc.output()


# --- deeply nested JSON ------------------------------------------------------------------------

DEEP = b"[" * 100_000


def test_deeply_nested_json_is_422_on_every_path(service: Service) -> None:
    headers = service.a.headers
    with httpx.Client(base_url=service.base, timeout=60) as http:
        cases = {
            "no key": {"Content-Type": "application/json"},
            "unknown key": {**headers, "Authorization": "Bearer dk_nobody"},
            "uncached key (FastAPI)": headers,
        }
        answers = {
            name: http.post("/v1/jobs", content=DEEP, headers=h) for name, h in cases.items()
        }
        assert http.get("/v1/jobs", headers=headers).status_code == 200  # now cached: hot path
        answers["cached key (hot path)"] = http.post("/v1/jobs", content=DEEP, headers=headers)
        answers["nested in a field"] = http.post(
            "/v1/jobs", content=service.a.body('"name": ' + "[" * 100_000), headers=headers
        )
        for field in ("arch", "input_shape"):
            value = ('{"name": "mlp", "config": ' if field == "arch" else "") + "[" * 60_000
            answers[field] = http.post(
                "/v1/models",
                files={"file": ("m.safetensors", b"\0" * 64)},
                data={field: value},
                headers={"Authorization": headers["Authorization"]},
            )
    for name, r in answers.items():
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
        assert r.json()["error"]["code"] in ("invalid_request", "invalid_spec", "unauthorized")
    assert answers["arch"].json()["error"]["details"]["field"] == "arch"
    assert answers["input_shape"].json()["error"]["details"]["field"] == "input_shape"
    assert "RecursionError" not in service.proc.output()


def test_nul_and_non_finite_values_in_upload_forms_are_422(service: Service) -> None:
    """What PostgreSQL would refuse to store is refused at the form, naming the field."""
    auth = {"Authorization": service.a.headers["Authorization"]}
    cases = [
        ("/v1/models", {"name": "a\x00b"}, "m.pt2", "name"),
        ("/v1/models", {"arch": '{"name": "mlp", "config": {"width": NaN}}'}, "m.st", "arch"),
        ("/v1/datasets", {"label_column": "y\x00"}, "d.csv", "label_column"),
    ]
    # A file name with a NUL byte, as a client that does not percent-encode it would send it.
    raw = (
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="d\x00.csv"\r\n\r\n'
        b"x,y\r\n--b--\r\n"
    )
    with httpx.Client(base_url=service.base, timeout=60) as http:
        answers = [
            (field, http.post(route, files={"file": (name, b"x" * 64)}, data=data, headers=auth))
            for route, data, name, field in cases
        ]
        type_ = {"Content-Type": "multipart/form-data; boundary=b"}
        answers.append(("file", http.post("/v1/datasets", content=raw, headers={**auth, **type_})))
    for field, r in answers:
        assert r.status_code == 422, (field, r.text)
        assert r.json()["error"]["details"].get("field") == field, r.text
    assert "Traceback" not in service.proc.output()


# --- event cursors -----------------------------------------------------------------------------


def test_out_of_range_event_cursors_are_422_and_good_ones_still_stream(service: Service) -> None:
    with httpx.Client(base_url=service.base, timeout=30) as http:
        job = http.post("/v1/jobs", content=service.b.body(), headers=service.b.headers).json()
        events = f"/v1/jobs/{job['id']}/events"
        auth = {"Authorization": service.b.headers["Authorization"]}
        for after in ("99999999999999999999", "2147483648", "-1", "9" * 5000):
            r = http.get(events, params={"after": after}, headers=auth)
            assert r.status_code == 422, (after[:30], r.text)
            assert r.json()["error"]["details"]["field"] == "after"
        stream = {**auth, "Accept": "text/event-stream"}
        for last in ("99999999999999999999", "9" * 5000, "12x", "-3"):
            r = http.get(events, headers={**stream, "Last-Event-ID": last})
            assert r.status_code == 422, (last[:30], r.text)
            error = r.json()["error"]
            assert (
                error["details"]["field"] == "Last-Event-ID" and "Last-Event-ID" in error["message"]
            )
        # A good cursor still resumes: the queued event (seq 1) is skipped after Last-Event-ID 1.
        http.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)
        text = http.get(events, headers={**stream, "Last-Event-ID": "1"}).text
        assert "id: 1\n" not in text and '"cancelled"' in text
        assert http.get(events, params={"after": 0}, headers=auth).json()["data"][0]["seq"] == 1


# --- multipart form floods ---------------------------------------------------------------------


def _form_head(base: str, path: str, key: str, boundary: str) -> bytes:
    host = urlsplit(base).netloc
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def _send_until_answered(
    service: Service, path: str, parts: Iterator[bytes]
) -> tuple[int, dict[str, Any], int]:
    """Stream form parts over a raw socket, never ending the body; the server's answer and how
    many parts it had been sent when it answered."""
    boundary = "flood"
    sent = 0
    where = urlsplit(service.base)
    with socket.create_connection((where.hostname, where.port), timeout=30) as sock:
        sock.sendall(_form_head(service.base, path, service.a.key, boundary))
        sock.setblocking(False)
        reply = b""
        for part in parts:
            try:
                sock.sendall(_chunk(f"--{boundary}\r\n".encode() + part + b"\r\n"))
            except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                break
            sent += 1
            try:
                reply += sock.recv(65536)
            except BlockingIOError:
                continue
            if b"\r\n\r\n" in reply:
                break
        else:
            pytest.fail(f"no answer after the {sent} parts sent; the body was never finished")
        sock.setblocking(True)
        deadline = time.monotonic() + 20
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            assert time.monotonic() < deadline, reply
            data = sock.recv(65536)
            if not data:
                break
            reply += data
    head, _, body = reply.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    text = body.decode(errors="replace")
    payload = json.loads(text[text.index("{") : text.rindex("}") + 1])
    return status, payload, sent


def _fields(size: int, count: int) -> Iterator[bytes]:
    for i in range(count):
        yield f'Content-Disposition: form-data; name="f{i}"\r\n\r\n'.encode() + b"x" * size


@pytest.mark.parametrize("route", ["/v1/models", "/v1/datasets"])
def test_a_flood_of_form_fields_is_refused_while_streaming(service: Service, route: str) -> None:
    """Refused as soon as the form passes its caps: the answer comes while most of the body is
    still unsent (it is never finished), and the API's memory does not grow with it."""
    api = psutil.Process(service.proc.popen.pid)
    rss = api.memory_info().rss
    # Many small fields: over the count.
    status, payload, sent = _send_until_answered(service, route, _fields(100, 20_000))
    assert status == 422, payload
    assert f"more than {MAX_FORM_FIELDS + 1} fields" in payload["error"]["message"]
    assert sent < 20_000
    # Fields of 60 KB, each under the per-field limit: over the total (20,000 would be 1.2 GB).
    status, payload, sent = _send_until_answered(service, route, _fields(60_000, 20_000))
    assert status == 413, payload
    assert payload["error"]["details"]["max_form_bytes"] == MAX_FORM_BYTES
    assert sent < 1000
    assert api.memory_info().rss - rss < 64 * 2**20
