"""Budget searches over HTTP (no worker): child jobs, tenancy, idempotency, quota, cancel and
settling (SQLite and PostgreSQL)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from core.jobs import claim_job, fail_job, finish_job
from core.models import Job
from core.searches import settle_search
from tests.conftest import POSTGRES_URL, require_service
from tests.service.api_support import Api, build_api, insert_dataset, insert_model
from tests.service.helpers import fresh_postgres, migrate
from worker.reconciler import reconcile


@pytest.fixture(scope="module")
def pg_database() -> Iterator[str]:
    require_service("PostgreSQL", "127.0.0.1", 5432)
    with fresh_postgres(POSTGRES_URL) as url:
        migrate(url)
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def api(request: pytest.FixtureRequest, tmp_path: Path) -> Api:
    if request.param == "postgres":
        url = request.getfixturevalue("pg_database")
    else:
        url = f"sqlite:///{tmp_path / 'distill.db'}"
        migrate(url)
    return build_api(url, tmp_path, max_active_jobs_per_tenant=6)


def _body(api: Api, headers: dict[str, str], tenant_id: str, **extra: Any) -> dict[str, Any]:
    with api.session() as s:
        teacher = insert_model(s, tenant_id)
        dataset = insert_dataset(s, tenant_id)
        ids = teacher.id, dataset.id
    return {
        "name": "tiny",
        "teacher": {"model_id": ids[0]},
        "dataset_id": ids[1],
        "training": {"epochs": 2, "batch_size": 32, "baseline": False},
        "budget": {"max_parameters": 20_000, "max_latency_ms": 50},
        "trials": 3,
        **extra,
    }


def test_search_creates_child_jobs_within_the_budget(api: Api) -> None:
    tenant = api.tenant()
    body = _body(api, tenant.headers, tenant.id)
    r = api.client.post("/v1/searches", json=body, headers=tenant.headers)
    assert r.status_code == 201, r.text
    search = r.json()
    assert search["status"] == "running" and search["result"] is None
    jobs = search["jobs"]
    assert len(jobs) == 3 and sorted(api.enqueued) == sorted(j["id"] for j in jobs)
    # Spread over the sizes the budget leaves, smallest first; none over it.
    sizes = [j["student"] for j in jobs]
    assert {s["preset"] for s in sizes} <= {"mlp", "cnn"}
    assert any(s["reason"] == "over the search's budget" for s in search["skipped"])
    assert all(s["parameters"] > 20_000 for s in search["skipped"])
    for job in jobs:  # ordinary jobs, with the tenant's spec and their own events
        got = api.client.get(f"/v1/jobs/{job['id']}", headers=tenant.headers).json()
        assert got["status"] == "queued"
        assert got["spec"]["student"]["preset"] == job["student"]["preset"]
        assert got["spec"]["export"] == ["onnx"]
        events = api.client.get(f"/v1/jobs/{job['id']}/events", headers=tenant.headers).json()
        assert events["data"][0]["data"] == {"status": "queued", "search_id": search["id"]}
    listed = api.client.get("/v1/searches", headers=tenant.headers).json()
    assert [s["id"] for s in listed["data"]] == [search["id"]]
    assert len(listed["data"][0]["jobs"]) == 3


def test_another_tenant_gets_404(api: Api) -> None:
    owner, other = api.tenant(), api.tenant()
    r = api.client.post(
        "/v1/searches", json=_body(api, owner.headers, owner.id), headers=owner.headers
    )
    search_id = r.json()["id"]
    for method, path in (("GET", ""), ("POST", "/cancel")):
        r = api.client.request(method, f"/v1/searches/{search_id}{path}", headers=other.headers)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert api.client.get("/v1/searches", headers=other.headers).json()["data"] == []
    # Nor may a search name another tenant's teacher.
    body = _body(api, owner.headers, owner.id)
    r = api.client.post("/v1/searches", json=body, headers=other.headers)
    assert r.status_code == 422 and r.json()["error"]["details"]["field"] == "teacher.model_id"


def test_idempotency_replays_and_conflicts(api: Api) -> None:
    tenant = api.tenant()
    body = _body(api, tenant.headers, tenant.id)
    headers = {**tenant.headers, "Idempotency-Key": "search-1"}
    first = api.client.post("/v1/searches", json=body, headers=headers)
    again = api.client.post("/v1/searches", json=body, headers=headers)
    assert first.status_code == 201 and again.status_code == 200
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == first.json()["id"] and len(api.enqueued) == 3
    changed = api.client.post("/v1/searches", json={**body, "trials": 2}, headers=headers)
    assert changed.status_code == 409


def test_children_count_against_the_job_quota(api: Api) -> None:
    tenant = api.tenant()
    body = _body(api, tenant.headers, tenant.id, trials=4)
    assert api.client.post("/v1/searches", json=body, headers=tenant.headers).status_code == 201
    r = api.client.post("/v1/searches", json=body, headers=tenant.headers)
    assert r.status_code == 429, r.text
    assert r.json()["error"]["details"] == {"limit": 6, "active": 4, "trials": 4}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"student": {"preset": "mlp"}}, "student"),
        ({"budget": {"max_parameters": 10}}, "budget"),
        ({"trials": 0}, "trials"),
        ({"budget": {"max_latency_ms": -1}}, "budget.max_latency_ms"),
        ({"space": {"presets": ["transformer"]}}, "space.presets"),
        ({"space": {"widths": [0]}}, "space.widths"),
    ],
)
def test_bad_searches_name_the_field(api: Api, change: dict[str, Any], field: str) -> None:
    tenant = api.tenant()
    body = {**_body(api, tenant.headers, tenant.id), **change}
    r = api.client.post("/v1/searches", json=body, headers=tenant.headers)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["details"]["field"] == field
    assert api.enqueued == []


def _finish(api: Api, job_id: str, accuracy: float, latency: float, size: int) -> None:
    with api.session() as s:
        claim_job(s, job_id, "w", 30)
        result = {
            "student": {
                "accuracy": accuracy,
                "parameters": size // 4,
                "size_bytes": size,
                "latency_ms_p50": latency,
            }
        }
        assert finish_job(s, job_id, "w", result, [])


def test_search_settles_with_pareto_set_and_best(api: Api) -> None:
    tenant = api.tenant()
    body = _body(api, tenant.headers, tenant.id, budget={"max_latency_ms": 1.0})
    search = api.client.post("/v1/searches", json=body, headers=tenant.headers).json()
    a, b, c = (j["id"] for j in search["jobs"])
    _finish(api, a, 0.90, 0.5, 4_000)  # within budget
    _finish(api, b, 0.95, 2.0, 40_000)  # most accurate, too slow
    with api.session() as s:
        assert settle_search(s, search["id"]) is None  # c is still queued
        claim_job(s, c, "w", 30)
        assert fail_job(s, c, {"code": "training_diverged", "message": "x"})
        assert settle_search(s, search["id"]) == "succeeded"
        assert settle_search(s, search["id"]) is None  # once
    got = api.client.get(f"/v1/searches/{search['id']}", headers=tenant.headers).json()
    result = got["result"]
    assert got["status"] == "succeeded"
    assert result["best_job_id"] == a and result["pareto"] == [a, b]
    rows = {t["job_id"]: t for t in result["trials"]}
    assert rows[a]["best"] and rows[a]["within_budget"] and not rows[b]["within_budget"]
    assert rows[c]["status"] == "failed" and rows[c]["error"] == "training_diverged"


def test_cancel_and_the_reconciler_settle(api: Api) -> None:
    tenant = api.tenant()
    search = api.client.post(
        "/v1/searches", json=_body(api, tenant.headers, tenant.id), headers=tenant.headers
    ).json()
    first = search["jobs"][0]["id"]
    with api.session() as s:
        claim_job(s, first, "w", 30)
    r = api.client.post(f"/v1/searches/{search['id']}/cancel", headers=tenant.headers)
    assert r.status_code == 200 and r.json()["status"] == "cancelling"
    assert [j["status"] for j in r.json()["jobs"]] == ["cancelling", "cancelled", "cancelled"]
    # The worker that ran it is gone: the reconciler settles both the job and the search.
    with api.session() as s:
        s.execute(update(Job).where(Job.id == first).values(heartbeat_at=None))
        s.commit()
    counts = reconcile(api.app.state.sessions, api.settings, send=lambda *_: None)
    assert counts["cancelled"] == 1 and counts["searches"] == 1
    got = api.client.get(f"/v1/searches/{search['id']}", headers=tenant.headers).json()
    assert got["status"] == "cancelled" and got["result"]["best_job_id"] is None
