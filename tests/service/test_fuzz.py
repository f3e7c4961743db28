"""Property-based fuzzing of every documented operation (schemathesis) against /openapi.json.

The app runs in process on a temporary SQLite database with auth off and a recording enqueue.
Each operation gets a bounded number of generated requests; every response must be a non-5xx
that matches the documented status codes, content type, headers and body schema. The upload
operations are fuzzed with fewer examples: each request opens its file in a sandboxed child.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks

from tests.service.api_support import build_api, insert_artifact, insert_dataset, insert_job
from tests.service.helpers import migrate

pytestmark = [pytest.mark.service, pytest.mark.slow]

CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
]
EXAMPLES = 25
UPLOAD_EXAMPLES = 4


def _app():  # noqa: ANN202 - a FastAPI app
    folder = Path(tempfile.mkdtemp(prefix="distill-fuzz-"))
    url = f"sqlite:///{folder / 'distill.db'}"
    migrate(url)
    api = build_api(url, folder, auth="off", max_upload_bytes=1_000_000)
    # Something to find: a job with events and an artifact, a dataset (ids are guessed anyway).
    api.client.get("/v1/jobs")  # creates the default tenant
    with api.session() as s:
        from core.models import Tenant

        tenant = s.query(Tenant).one()
        job = insert_job(s, tenant.id, status="succeeded")
        insert_artifact(s, api.storage, job, b"student bytes")
        insert_dataset(s, tenant.id)
    return api.app


schema = schemathesis.openapi.from_asgi("/openapi.json", _app())


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_every_operation_answers_within_its_documented_contract(case) -> None:  # noqa: ANN001
    if case.operation.method.upper() == "POST" and case.operation.path in (
        "/v1/models",
        "/v1/datasets",
    ):
        # Bounded separately: each request starts a sandboxed child process.
        if _upload_calls.setdefault(case.operation.path, 0) >= UPLOAD_EXAMPLES:
            return
        _upload_calls[case.operation.path] += 1
    case.call_and_validate(checks=CHECKS)


_upload_calls: dict[str, int] = {}
