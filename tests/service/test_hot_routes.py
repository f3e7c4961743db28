"""GET /v1/jobs/{id} and POST /v1/jobs answered by api.hot_routes: the same answers as FastAPI's
handlers give, for good requests and bad ones alike."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from api.hot_routes import HotRoutes
from core.job_creation import MAX_IDEMPOTENCY_KEY_LENGTH, MAX_SPEC_BYTES
from tests.service.api_support import Api, Tenant, build_api, insert_dataset, insert_model
from tests.service.helpers import migrate

# Differ between any two jobs, whichever route made them.
PER_JOB = ("id", "created_at")


@pytest.fixture
def apps(tmp_path: Path) -> tuple[Api, Api]:
    """Two apps on one database: ``hot`` caches callers, so its plain requests take the hot
    routes; ``plain`` caches nothing, so every request goes through FastAPI."""
    url = f"sqlite:///{tmp_path / 'distill.db'}"
    migrate(url)
    hot = build_api(url, tmp_path / "hot")
    plain = build_api(url, tmp_path / "plain", auth_cache_seconds=0)
    return hot, plain


@pytest.fixture
def owner(apps: tuple[Api, Api]) -> tuple[Tenant, dict[str, Any]]:
    """A tenant, and a spec naming its teacher and dataset."""
    hot, _ = apps
    tenant = hot.tenant()
    with hot.session() as s:
        teacher = insert_model(s, tenant.id)
        dataset = insert_dataset(s, tenant.id)
    return tenant, {"teacher": {"model_id": teacher.id}, "dataset_id": dataset.id}


@pytest.fixture
def hot_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The requests the hot routes answered themselves (not handed on to FastAPI)."""
    answered: list[str] = []
    real_get, real_post = HotRoutes._get_job, HotRoutes._post_job

    async def get_job(self: HotRoutes, scope: Any, *args: Any) -> bool:
        done = await real_get(self, scope, *args)
        if done:
            answered.append(f"GET {scope['path']}")
        return done

    async def post_job(self: HotRoutes, scope: Any, *args: Any) -> Any:
        replay = await real_post(self, scope, *args)
        if replay is None:
            answered.append(f"POST {scope['path']}")
        return replay

    monkeypatch.setattr(HotRoutes, "_get_job", get_job)
    monkeypatch.setattr(HotRoutes, "_post_job", post_job)
    return answered


def _same(hot: httpx.Response, plain: httpx.Response, ignore: tuple[str, ...] = ()) -> None:
    assert hot.status_code == plain.status_code, (hot.text, plain.text)
    assert hot.headers.get("content-type") == plain.headers.get("content-type")
    assert hot.headers.get("idempotent-replayed") == plain.headers.get("idempotent-replayed")
    hot_body, plain_body = hot.json(), plain.json()
    for key in ignore:
        hot_body.pop(key), plain_body.pop(key)
    assert hot_body == plain_body


def test_get_job_answers_as_fastapi_does(
    apps: tuple[Api, Api], owner: tuple[Tenant, dict[str, Any]], hot_calls: list[str]
) -> None:
    hot, plain = apps
    tenant, spec = owner
    job = hot.client.post("/v1/jobs", json=spec, headers=tenant.headers).json()
    stranger = hot.tenant()

    for path, headers in [
        (f"/v1/jobs/{job['id']}", tenant.headers),  # found
        (f"/v1/jobs/{job['id']}", stranger.headers),  # another tenant's: 404, never 403
        ("/v1/jobs/job_does_not_exist", tenant.headers),
    ]:
        hot.client.get(path, headers=headers)  # the first request caches the caller
        _same(hot.client.get(path, headers=headers), plain.client.get(path, headers=headers))

    found = hot.client.get(f"/v1/jobs/{job['id']}", headers=tenant.headers).json()
    assert found == job
    assert hot_calls.count(f"GET /v1/jobs/{job['id']}") >= 3
    assert "GET /v1/jobs/job_does_not_exist" in hot_calls


def test_post_job_answers_as_fastapi_does(
    apps: tuple[Api, Api], owner: tuple[Tenant, dict[str, Any]], hot_calls: list[str]
) -> None:
    hot, plain = apps
    tenant, spec = owner
    hot.client.get("/v1/jobs/job_x", headers=tenant.headers)  # cache the caller

    def both(**request: Any) -> tuple[httpx.Response, httpx.Response]:
        request.setdefault("headers", {}).update(tenant.headers)
        return hot.client.post("/v1/jobs", **request), plain.client.post("/v1/jobs", **request)

    made, made_plain = both(json={**spec, "name": "digits"})
    assert made.status_code == 201
    _same(made, made_plain, ignore=PER_JOB)
    assert hot.enqueued == [made.json()["id"]] and plain.enqueued == [made_plain.json()["id"]]

    # The same Idempotency-Key again: each app replays the job it made first.
    hot_first = hot.client.post(
        "/v1/jobs", json=spec, headers={**tenant.headers, "Idempotency-Key": "k-hot"}
    )
    plain_first = plain.client.post(
        "/v1/jobs", json=spec, headers={**tenant.headers, "Idempotency-Key": "k-plain"}
    )
    hot_again = hot.client.post(
        "/v1/jobs", json=spec, headers={**tenant.headers, "Idempotency-Key": "k-hot"}
    )
    plain_again = plain.client.post(
        "/v1/jobs", json=spec, headers={**tenant.headers, "Idempotency-Key": "k-plain"}
    )
    assert hot_again.status_code == 200 and hot_again.json()["id"] == hot_first.json()["id"]
    assert plain_again.json()["id"] == plain_first.json()["id"]
    _same(hot_again, plain_again, ignore=PER_JOB)

    # Mistakes get the same errors, whichever way they went.
    for request in [
        {"json": {**spec, "epochs": 3}},  # an unknown field
        {"json": {"dataset_id": spec["dataset_id"]}},  # no teacher
        {"json": {**spec, "dataset_id": "ds_missing"}},
        {"json": [spec]},  # not an object
        {"content": b"{not json", "headers": {"Content-Type": "application/json"}},
        {"content": b"\xff\xfe", "headers": {"Content-Type": "application/json"}},
        {"json": spec, "headers": {"Idempotency-Key": "k" * (MAX_IDEMPOTENCY_KEY_LENGTH + 1)}},
        {"json": spec, "headers": {"Idempotency-Key": ""}},
    ]:
        hot_error, plain_error = both(**request)
        assert hot_error.status_code == 422, (request, hot_error.text)
        _same(hot_error, plain_error)

    assert hot_calls.count("POST /v1/jobs") == 6  # made, two keyed, three spec errors

    # The longest key allowed is taken at both doors: they read one limit.
    for api, letter in ((hot, "h"), (plain, "p")):
        key = letter * MAX_IDEMPOTENCY_KEY_LENGTH
        r = api.client.post(
            "/v1/jobs", json=spec, headers={**tenant.headers, "Idempotency-Key": key}
        )
        assert r.status_code == 201, r.text
    assert hot_calls.count("POST /v1/jobs") == 7


def test_a_spec_over_the_limit_is_refused_unread(
    apps: tuple[Api, Api], owner: tuple[Tenant, dict[str, Any]]
) -> None:
    hot, plain = apps
    tenant, spec = owner
    huge = {**spec, "name": "x" * MAX_SPEC_BYTES}
    for api in (hot, plain):
        r = api.client.post("/v1/jobs", json=huge, headers=tenant.headers)
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "payload_too_large"
        assert str(MAX_SPEC_BYTES) in r.json()["error"]["message"]
    assert hot.enqueued == plain.enqueued == []


def test_hot_routes_are_counted_and_authenticated(
    apps: tuple[Api, Api], owner: tuple[Tenant, dict[str, Any]], hot_calls: list[str]
) -> None:
    hot, _ = apps
    tenant, spec = owner
    for _ in range(3):
        job = hot.client.post("/v1/jobs", json=spec, headers=tenant.headers).json()
        hot.client.get(f"/v1/jobs/{job['id']}", headers=tenant.headers)
    assert "POST /v1/jobs" in hot_calls and f"GET /v1/jobs/{job['id']}" in hot_calls

    metrics = hot.client.get("/metrics").text
    assert 'distill_http_requests_total{method="POST",route="/v1/jobs",status="201"} 3.0' in metrics
    assert (
        'distill_http_requests_total{method="GET",route="/v1/jobs/{job_id}",status="200"} 3.0'
        in metrics
    )
    # A caller the cache does not know is checked by FastAPI's dependency, as ever.
    for headers in ({}, {"Authorization": "Bearer dk_wrong"}):
        assert hot.client.get(f"/v1/jobs/{job['id']}", headers=headers).status_code == 401
        assert hot.client.post("/v1/jobs", json=spec, headers=headers).status_code == 401


def test_an_unexpected_failure_is_a_logged_500_in_the_envelope(
    apps: tuple[Api, Api],
    owner: tuple[Tenant, dict[str, Any]],
    hot_calls: list[str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The hot routes sit outside FastAPI's error handling, so they give its 500 themselves."""
    hot, plain = apps
    tenant, spec = owner
    job = hot.client.post("/v1/jobs", json=spec, headers=tenant.headers).json()

    def database_gone(*args: Any) -> Any:
        raise RuntimeError("the database went away")

    monkeypatch.setattr("api.routes.jobs.read_job", database_gone)
    for api in (hot, plain):
        api.app.state.job_intake.submit = database_gone
    answers = []
    for api in (hot, plain):
        client = TestClient(api.app, raise_server_exceptions=False)  # answers as a server does
        answers.append(client.get(f"/v1/jobs/{job['id']}", headers=tenant.headers))
        answers.append(client.post("/v1/jobs", json=spec, headers=tenant.headers))
    for hot_answer, plain_answer in zip(answers[:2], answers[2:], strict=True):
        assert hot_answer.status_code == 500
        assert hot_answer.json()["error"]["code"] == "internal"
        _same(hot_answer, plain_answer)
    assert hot_calls[-2:] == [f"GET /v1/jobs/{job['id']}", "POST /v1/jobs"]
    logged = [r for r in caplog.records if "the database went away" in str(r.exc_info)]
    assert len(logged) == 4  # both apps, both routes
