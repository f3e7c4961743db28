"""Every API request logs one structured line carrying the caller's tenant and the job id."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest

from core.logging import ContextFilter, JsonFormatter
from tests.service.api_support import build_api, insert_dataset, insert_model
from tests.service.helpers import migrate


@pytest.fixture
def json_lines() -> io.StringIO:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ContextFilter())
    logger = logging.getLogger("distill.api")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)  # setLevel, not an assignment: it clears the loggers' cache
    yield stream
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_request_lines_carry_tenant_and_job_id(tmp_path: Path, json_lines: io.StringIO) -> None:
    url = f"sqlite:///{tmp_path / 'distill.db'}"
    migrate(url)
    api = build_api(url, tmp_path)
    tenant = api.tenant()
    with api.session() as session:
        model = insert_model(session, tenant.id)
        dataset = insert_dataset(session, tenant.id)
    spec = {"teacher": {"model_id": model.id}, "dataset_id": dataset.id}
    job = api.client.post("/v1/jobs", json=spec, headers=tenant.headers).json()
    api.client.get(f"/v1/jobs/{job['id']}", headers=tenant.headers)
    api.client.get("/healthz")

    lines = [json.loads(line) for line in json_lines.getvalue().splitlines()]
    requests = {
        line["message"].split(" ")[0] + " " + line["message"].split(" ")[1]: line for line in lines
    }
    created = requests["POST /v1/jobs"]
    assert created["tenant"] == tenant.id and created["job_id"] == job["id"]
    assert created["message"].split(" ")[2] == "201"
    read = requests[f"GET /v1/jobs/{job['id']}"]
    assert read["tenant"] == tenant.id and read["job_id"] == job["id"]
    health = requests["GET /healthz"]
    assert "tenant" not in health and "job_id" not in health  # nothing leaks between requests
