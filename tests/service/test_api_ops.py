"""Operations and the HTTP surface: health, readiness, metrics, OpenAPI, the error envelope."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.service.api_support import Api, build_api, insert_job
from tests.service.helpers import migrate

OPERATOR_TOKEN = "operator-token-for-tests"
OPERATOR = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}


@pytest.fixture
def api(tmp_path: Path) -> Api:
    url = f"sqlite:///{tmp_path / 'distill.db'}"
    migrate(url)
    return build_api(url, tmp_path, operator_token=OPERATOR_TOKEN)


def test_healthz(api: Api) -> None:
    r = api.client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_readyz_checks_database_broker_and_storage(api: Api) -> None:
    r = api.client.get("/readyz", headers=OPERATOR)
    assert r.status_code == 200, r.text
    assert r.json() == {
        "status": "ready",
        "checks": {"database": "ok", "broker": "ok", "storage": "ok"},
    }
    # Without the operator token (or with a tenant's key): ready or not, nothing more.
    assert api.client.get("/readyz").json() == {"status": "ready"}
    tenant = api.tenant()
    assert api.client.get("/readyz", headers=tenant.headers).json() == {"status": "ready"}


def test_readyz_with_redis_broker(tmp_path: Path, redis_url: str) -> None:
    url = f"sqlite:///{tmp_path / 'distill.db'}"
    migrate(url)
    api = build_api(url, tmp_path, operator_token=OPERATOR_TOKEN)
    api.app.state.readiness_checks["broker"] = _broker_check(redis_url)
    assert api.client.get("/readyz", headers=OPERATOR).json()["checks"]["broker"] == "ok"


def _broker_check(url: str):  # noqa: ANN202
    from api.routes.ops import broker_check
    from core.config import Settings

    return broker_check(Settings(broker_url=url))


def test_readyz_names_the_part_that_is_down(api: Api, tmp_path: Path) -> None:
    # A broker nobody listens on, and a storage folder that has disappeared.
    api.app.state.readiness_checks["broker"] = _broker_check("redis://127.0.0.1:1/0")
    root = Path(api.storage.root)  # type: ignore[attr-defined]
    root.rmdir()
    hidden = api.client.get("/readyz")
    assert hidden.status_code == 503
    assert hidden.json()["error"] == {"code": "not_ready", "message": "not ready", "details": {}}
    r = api.client.get("/readyz", headers=OPERATOR)
    assert r.status_code == 503
    error = r.json()["error"]
    assert error["code"] == "not_ready"
    assert sorted(error["details"]["failed"]) == ["broker", "storage"]
    assert error["details"]["checks"]["database"] == "ok"
    assert "broker" in error["message"] and "storage" in error["message"]


def test_metrics_count_requests_by_route_and_read_jobs_from_the_database(api: Api) -> None:
    tenant = api.tenant()
    with api.session() as s:
        for status in ("queued", "queued", "running", "failed"):
            insert_job(s, tenant.id, status=status)
        job = insert_job(s, tenant.id)
    api.client.get(f"/v1/jobs/{job.id}", headers=tenant.headers)
    api.client.get(f"/v1/jobs/{job.id}", headers=tenant.headers)
    api.client.get("/v1/jobs/job_nope", headers=tenant.headers)
    api.client.get("/no/such/route")
    text = api.client.get("/metrics", headers=OPERATOR).text

    def value(pattern: str) -> float:
        match = re.search(rf"^{pattern} (\S+)$", text, re.M)
        assert match, f"{pattern} not in /metrics"
        return float(match.group(1))

    route = 'route="/v1/jobs/{job_id}"'
    assert value(rf'distill_http_requests_total\{{method="GET",{route},status="200"\}}') == 2
    assert value(rf'distill_http_requests_total\{{method="GET",{route},status="404"\}}') == 1
    assert value(r'distill_http_requests_total\{method="GET",route="unmatched",status="404"\}') == 1
    assert value(rf'distill_http_request_duration_seconds_count\{{method="GET",{route}\}}') == 3
    assert value(r'distill_jobs\{status="queued"\}') == 3
    assert value(r'distill_jobs\{status="running"\}') == 1
    assert value(r'distill_jobs\{status="succeeded"\}') == 0
    assert value(r'distill_queue_depth\{queue="cpu"\}') == 3


def test_openapi_documents_every_route_and_its_errors(api: Api) -> None:
    schema = api.client.get("/openapi.json").json()
    operations = [
        (path, method, op) for path, item in schema["paths"].items() for method, op in item.items()
    ]
    assert len(operations) >= 16
    for path, method, op in operations:
        assert op.get("summary") and op.get("description"), (path, method)
        if path.startswith("/v1/"):
            assert "401" in op["responses"], (path, method)
            assert "200" in op["responses"] or "201" in op["responses"], (path, method)
        if "{" in path:
            assert "404" in op["responses"], (path, method)
    post_jobs = schema["paths"]["/v1/jobs"]["post"]
    assert {"409", "422"} <= set(post_jobs["responses"])
    body = post_jobs["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/JobSpec"}
    assert "teacher" in schema["components"]["schemas"]["JobSpec"]["properties"]
    upload = schema["paths"]["/v1/models"]["post"]["requestBody"]["content"]
    assert "file" in upload["multipart/form-data"]["schema"]["properties"]


def test_unknown_routes_and_methods_use_the_error_envelope(api: Api) -> None:
    r = api.client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = api.client.put("/v1/jobs")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_malformed_json_is_invalid_request(api: Api) -> None:
    tenant = api.tenant()
    r = api.client.post(
        "/v1/jobs",
        content=b"{not json",
        headers={**tenant.headers, "Content-Type": "application/json"},
    )
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"


def test_unexpected_errors_are_500_without_a_traceback(api: Api) -> None:
    @api.app.get("/boom")
    def boom() -> None:
        raise ZeroDivisionError("secret internals")

    client = TestClient(api.app, raise_server_exceptions=False)
    r = client.get("/boom")
    assert r.status_code == 500
    assert r.json()["error"]["code"] == "internal"
    assert "secret" not in r.text and "Traceback" not in r.text


def test_metrics_need_the_operator_token_when_one_is_set(api: Api) -> None:
    tenant = api.tenant()
    for headers in ({}, tenant.headers, {"Authorization": "Bearer wrong-operator-token"}):
        r = api.client.get("/metrics", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert "distill_" not in r.text
    assert api.client.get("/metrics", headers=OPERATOR).status_code == 200


def test_metrics_without_an_operator_token_name_no_job(tmp_path: Path) -> None:
    """With no token set, /metrics is open but shows counts only: no job id of any tenant."""
    url = f"sqlite:///{tmp_path / 'distill.db'}"
    migrate(url)
    api = build_api(url, tmp_path)
    tenant = api.tenant()
    with api.session() as s:
        job = insert_job(s, tenant.id, status="running")
        job.started_at = job.heartbeat_at = job.created_at
        s.commit()
        job_id = job.id
    text = api.client.get("/metrics").text
    assert 'distill_jobs{status="running"} 1.0' in text
    assert "distill_job_heartbeat_age_seconds_max" in text
    assert job_id not in text and "job_id=" not in text and tenant.id not in text


def test_readyz_hides_what_failed_and_why_from_everyone_but_the_operator(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'distill.db'}"
    migrate(url)
    api = build_api(url, tmp_path)  # no operator token: nobody sees the checks
    api.app.state.readiness_checks["broker"] = _broker_check("redis://127.0.0.1:1/0")
    r = api.client.get("/readyz")
    assert r.status_code == 503 and r.json()["error"]["details"] == {}
    assert "redis" not in r.text and str(tmp_path) not in r.text
