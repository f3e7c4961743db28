"""Budgets and quotas through a real API process (SQLite and PostgreSQL): a job over budget is
refused with its estimate, a tenant at its job quota gets 429 and Retry-After, and uploads stop
at the tenant's storage quota, while the other tenant is never affected."""

from __future__ import annotations

import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from core.db import session_scope
from core.models import Dataset, new_id
from tests.service.real_api import Service, open_database, start_service

pytestmark = pytest.mark.service

MAX_JOBS = 3
QUOTA = 200_000  # bytes of uploads per tenant


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def service(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("quotas")
    with open_database(request.param, tmp) as url:
        service = start_service(
            url,
            tmp,
            max_active_jobs_per_tenant=str(MAX_JOBS),
            max_tenant_storage_bytes=str(QUOTA),
        )
        try:
            yield service
        finally:
            service.proc.stop()


@pytest.fixture
def http(service: Service) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.base, timeout=60) as client:
        yield client


# The jobs, which a paused worker would otherwise have queued for a week.
OVER_BUDGET = {
    "mlp 8192 wide x 64 deep": (
        '"student": {"preset": "mlp", "width": 8192, "depth": 64}',
        "parameters",
    ),
    "8 stages of it": (
        '"stages": '
        + "["
        + ", ".join(['{"student": {"preset": "mlp", "width": 8192, "depth": 64}}'] * 8)
        + "]",
        "parameters",
    ),
    # (A transformer of that size on these images is refused earlier, as the wrong preset for
    # the data: tests/core/test_budget.py estimates it on token sequences.)
    "cnn 4096 x 64 layers": (
        '"student": {"preset": "cnn", "width": 4096, "depth": 64}',
        "parameters",
    ),
    "10,000 epochs at batch 1 for a week": (
        '"training": {"epochs": 10000, "batch_size": 1, "max_minutes": 10080}',
        "optimizer_steps",
    ),
}


def test_jobs_over_budget_are_refused_with_their_estimate(
    service: Service, http: httpx.Client
) -> None:
    for name, (extra, limit) in OVER_BUDGET.items():
        r = http.post("/v1/jobs", content=service.b.body(extra), headers=service.b.headers)
        assert r.status_code == 422, (name, r.text)
        error = r.json()["error"]
        assert error["code"] == "over_budget", (name, error)
        assert error["details"]["estimate"][limit] > error["details"]["limit"][limit], name
        assert "limit" in error["message"] and "DISTILL_" in error["message"]
    assert service.jobs(service.b) == 0


def test_a_tenant_at_its_job_quota_gets_429_and_the_other_tenant_does_not(
    service: Service, http: httpx.Client
) -> None:
    a, b = service.a, service.b
    # Sent at once: exactly the quota is admitted, whatever the batches.
    with ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(
                lambda i: http.post(
                    "/v1/jobs", content=a.body(f'"name": "a{i}"'), headers=a.headers
                ),
                range(8),
            )
        )
    created = [r for r in answers if r.status_code == 201]
    refused = [r for r in answers if r.status_code != 201]
    assert len(created) == MAX_JOBS and {r.status_code for r in refused} == {429}
    error = refused[0].json()["error"]
    assert error["code"] == "quota_exceeded" and str(MAX_JOBS) in error["message"]
    assert error["details"] == {"limit": MAX_JOBS, "active": MAX_JOBS}
    assert int(refused[0].headers["Retry-After"]) > 0
    assert service.jobs(a) == MAX_JOBS

    r = http.post("/v1/jobs", content=b.body(), headers=b.headers)
    assert r.status_code == 201, r.text  # another tenant's quota is its own

    # A cancelled job no longer counts.
    auth = {"Authorization": a.headers["Authorization"]}
    assert http.post(f"/v1/jobs/{created[0].json()['id']}/cancel", headers=auth).status_code == 200
    assert http.post("/v1/jobs", content=a.body(), headers=a.headers).status_code == 201
    assert http.post("/v1/jobs", content=a.body(), headers=a.headers).status_code == 429


def _npz(n: int) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    np.savez(buf, x=rng.random((n, 1, 8, 8), dtype=np.float32), y=np.arange(n) % 10)
    return buf.getvalue()


def _store(service: Service, tenant_id: str, size: int) -> str:
    """A dataset row of ``size`` bytes, as if uploaded before."""
    with session_scope(service.url) as s:
        row = Dataset(
            id=new_id("ds"),
            tenant_id=tenant_id,
            name="old",
            format="npz",
            options={},
            n_samples=1,
            x_shape=[None, 1],
            x_dtype="float32",
            has_labels=False,
            n_classes=None,
            info={},
            size_bytes=size,
            sha256="0" * 64,
            storage_key=f"datasets/{tenant_id}/old",
        )
        s.add(row)
        return row.id


def test_uploads_stop_at_the_tenant_storage_quota(service: Service, http: httpx.Client) -> None:
    a, b = service.a, service.b
    auth = {"Authorization": a.headers["Authorization"]}
    small, big = _npz(40), _npz(600)  # about 13 kB and 190 kB
    assert len(small) < QUOTA // 10 and QUOTA // 2 < len(big) < QUOTA

    # Under the quota: stored.
    r = http.post("/v1/datasets", files={"file": ("small.npz", small)}, headers=auth)
    assert r.status_code == 201, r.text

    # This upload would pass the quota: refused while it streams, nothing kept.
    _store(service, a.tenant_id, QUOTA // 2)
    r = http.post("/v1/datasets", files={"file": ("big.npz", big)}, headers=auth)
    assert r.status_code == 413, r.text
    error = r.json()["error"]
    assert error["code"] == "quota_exceeded" and "quota" in error["message"]
    assert error["details"]["quota_bytes"] == QUOTA
    listed = http.get("/v1/datasets", params={"limit": 100}, headers=auth).json()["data"]
    assert "big" not in {d["name"] for d in listed}

    # At the quota: refused before the body is read, for models too.
    _store(service, a.tenant_id, QUOTA)
    for route in ("/v1/datasets", "/v1/models"):
        r = http.post(route, files={"file": ("f.npz", small)}, headers=auth)
        assert r.status_code == 413 and r.json()["error"]["code"] == "quota_exceeded", r.text

    # The other tenant's quota is its own.
    r = http.post(
        "/v1/datasets",
        files={"file": ("big.npz", big)},
        headers={"Authorization": b.headers["Authorization"]},
    )
    assert r.status_code == 201, r.text
