"""Structured logs of the service processes, and the job-time metrics read from the database."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from client.sdk import Job
from core.logging import (
    JsonFormatter,
    bind_log_context,
    configure_logging,
    flush_logging,
    log_context,
)
from core.models import utcnow
from tests.client.conftest import Service
from tests.service.api_support import build_api, insert_job
from tests.service.helpers import fresh_postgres, migrate


def _json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_json_formatter_carries_the_context(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(json=True, level="INFO")
    try:
        log = logging.getLogger("distill.test")
        bind_log_context(tenant="nobody")  # outside a context: ignored, nothing leaks
        with log_context(job_id="job_1"):
            bind_log_context(tenant="acme")
            log.info("hello %s", "there")
        log.warning("after")
    finally:
        for handler in list(logging.getLogger().handlers):
            if getattr(handler, "_distill", False):
                logging.getLogger().removeHandler(handler)
    first, second = _json_lines(capsys.readouterr().err)[-2:]
    assert first["message"] == "hello there" and first["level"] == "info"
    assert first["logger"] == "distill.test" and first["job_id"] == "job_1"
    assert first["tenant"] == "acme" and "ts" in first
    assert "job_id" not in second and "tenant" not in second
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "boom", None, None)
    assert json.loads(JsonFormatter().format(record))["level"] == "error"


class _StuckStream(io.StringIO):
    """stderr on a disk that stalls: every write waits until ``unstick`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.unstick = threading.Event()

    def write(self, text: str) -> int:
        assert self.unstick.wait(30), "a write was never released"
        return super().write(text)


def test_background_logging_never_waits_on_the_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = _StuckStream()
    monkeypatch.setattr(sys, "stderr", stream)
    configure_logging(json=True, level="INFO", background=True)
    try:
        log = logging.getLogger("distill.test")
        with log_context(job_id="job_1", tenant="acme"):
            for i in range(3):
                log.info("request %d", i)  # returns although the stream is stuck
        assert stream.getvalue() == ""
        stream.unstick.set()
        flush_logging()
    finally:
        flush_logging()
        for handler in list(logging.getLogger().handlers):
            if getattr(handler, "_distill", False):
                logging.getLogger().removeHandler(handler)
    lines = _json_lines(stream.getvalue())
    assert [line["message"] for line in lines] == ["request 0", "request 1", "request 2"]
    assert all(line["job_id"] == "job_1" and line["tenant"] == "acme" for line in lines)


@pytest.mark.service
@pytest.mark.slow
def test_service_logs_are_json_with_the_job(service: Service, finished_job: Job) -> None:
    api_lines = _json_lines(service.api.output())
    assert any("/v1/jobs" in str(line["message"]) for line in api_lines)  # access log
    assert all({"ts", "level", "logger", "message"} <= set(line) for line in api_lines)
    job_lines = [
        line
        for line in _json_lines(service.worker.output())
        if line.get("job_id") == finished_job.id
    ]
    assert job_lines, service.worker.output()[-2000:]
    assert any(line.get("tenant") for line in job_lines)


@pytest.mark.service
@pytest.mark.slow
def test_duration_histogram_after_a_real_job(service: Service, finished_job: Job) -> None:
    with service.client() as client:
        text = client.http.get("/metrics").text
    count = _sample(text, 'distill_job_duration_seconds_count{status="succeeded"}')
    assert count >= 1
    assert (
        _sample(text, 'distill_job_duration_seconds_bucket{le="+Inf",status="succeeded"}') == count
    )
    assert _sample(text, 'distill_job_duration_seconds_sum{status="succeeded"}') > 0


def _sample(text: str, name: str) -> float:
    match = re.search("^" + re.escape(name) + r" (\S+)", text, re.MULTILINE)
    assert match, f"{name} not in /metrics:\n{text[:3000]}"
    return float(match.group(1))


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'db.sqlite'}"
        migrate(url)
        yield url
        return
    base = request.getfixturevalue("postgres_url")
    with fresh_postgres(base) as url:
        migrate(url)
        yield url


OPERATOR_TOKEN = "operator-token-for-tests"


def test_job_times_from_the_database(database: str, tmp_path: Path) -> None:
    api = build_api(database, tmp_path, lease_seconds=30, operator_token=OPERATOR_TOKEN)
    tenant = api.tenant()
    now = utcnow()
    with api.session() as session:
        for status, seconds in (("succeeded", 3), ("succeeded", 100), ("failed", 0.5)):
            job = insert_job(session, tenant.id, status=status)
            job.started_at, job.finished_at = now - timedelta(seconds=seconds), now
        fresh = insert_job(session, tenant.id, status="running")
        fresh.started_at, fresh.heartbeat_at = now, now - timedelta(seconds=1)
        stale = insert_job(session, tenant.id, status="running")
        stale.started_at, stale.heartbeat_at = now, now - timedelta(seconds=120)
        session.commit()
        fresh_id, stale_id = fresh.id, stale.id
    operator = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
    text = api.client.get("/metrics", headers=operator).text
    assert _sample(text, 'distill_job_duration_seconds_count{status="succeeded"}') == 2
    assert _sample(text, 'distill_job_duration_seconds_sum{status="succeeded"}') == pytest.approx(
        103, abs=0.1
    )
    assert _sample(text, 'distill_job_duration_seconds_bucket{le="5",status="succeeded"}') == 1
    assert _sample(text, 'distill_job_duration_seconds_bucket{le="120",status="succeeded"}') == 2
    assert _sample(text, 'distill_job_duration_seconds_bucket{le="1",status="failed"}') == 1
    assert _sample(text, "distill_jobs_stale_heartbeat") == 1
    assert _sample(text, f'distill_job_heartbeat_age_seconds{{job_id="{stale_id}"}}') >= 120
    assert _sample(text, f'distill_job_heartbeat_age_seconds{{job_id="{fresh_id}"}}') < 30
    assert _sample(text, "distill_job_heartbeat_age_seconds_max") >= 120
