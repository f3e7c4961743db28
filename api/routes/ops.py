"""Operations: liveness, readiness (database, broker, storage) and Prometheus metrics."""

from __future__ import annotations

import concurrent.futures
import logging
import secrets
from collections.abc import Callable

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from api.errors import NotReady
from api.schemas import Health, Readiness, error_responses
from core.config import Settings
from core.db import get_engine
from core.errors import Unauthorized
from core.storage import Storage

log = logging.getLogger("distill.api")
router = APIRouter(tags=["operations"])

CHECK_TIMEOUT_SECONDS = 5.0

Check = Callable[[], None]


def database_check(url: str) -> Check:
    def check() -> None:
        with get_engine(url).connect() as conn:
            conn.execute(text("SELECT 1"))

    return check


def broker_check(settings: Settings) -> Check:
    def check() -> None:
        try:
            from worker.celery_app import celery_app
        except ModuleNotFoundError:  # the API without the worker package: ask kombu directly
            from kombu import Connection

            conn = Connection(settings.broker)
        else:
            conn = celery_app.connection_for_write(url=settings.broker)
        with conn:
            conn.ensure_connection(max_retries=1, interval_start=0.2, timeout=CHECK_TIMEOUT_SECONDS)

    return check


def storage_check(storage: Storage) -> Check:
    return storage.check


def default_checks(settings: Settings, storage: Storage) -> dict[str, Check]:
    """The dependencies /readyz asks about."""
    return {
        "database": database_check(settings.database),
        "broker": broker_check(settings),
        "storage": storage_check(storage),
    }


def run_checks(checks: dict[str, Check], timeout: float) -> dict[str, str]:
    """Run the checks in parallel; ``ok`` or ``error: …`` for each (a hung one times out)."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(checks) or 1)
    futures = {name: pool.submit(fn) for name, fn in checks.items()}
    results: dict[str, str] = {}
    for name, future in futures.items():
        try:
            future.result(timeout=timeout)
            results[name] = "ok"
        except concurrent.futures.TimeoutError:
            results[name] = f"error: no answer within {timeout:g} s"
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            results[name] = f"error: {type(exc).__name__}: {exc}"[:300]
    pool.shutdown(wait=False)
    return results


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """Liveness: the process is up."""
    return Health()


def is_operator(request: Request) -> bool:
    """Whether the caller holds the operator token (``DISTILL_OPERATOR_TOKEN``), when one is set."""
    token = request.app.state.settings.operator_token
    given = request.headers.get("authorization", "")
    return token is not None and secrets.compare_digest(given.encode(), f"Bearer {token}".encode())


@router.get(
    "/readyz",
    response_model=Readiness,
    response_model_exclude_none=True,
    responses=error_responses(503),
)
def readyz(request: Request) -> Readiness:
    """Readiness: the database, the broker and storage are reachable.

    Which of them failed, and why, is shown only with the operator token (the log has it too).
    """
    results = run_checks(request.app.state.readiness_checks, CHECK_TIMEOUT_SECONDS)
    failed = [name for name, result in results.items() if result != "ok"]
    operator = is_operator(request)
    if failed:
        log.warning("not ready: %s", results)
        if not operator:
            raise NotReady("not ready")
        raise NotReady(
            f"not ready: {', '.join(failed)} unreachable",
            details={"checks": results, "failed": failed},
        )
    return Readiness(checks=results if operator else None)


@router.get(
    "/metrics",
    response_class=Response,
    response_model=None,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text"}}
    | error_responses(401),
)
def metrics(request: Request) -> Response:
    """Prometheus metrics: requests, latencies, jobs by status, queue depth.

    With DISTILL_OPERATOR_TOKEN set, only its holder may scrape them, and gets each running
    job's heartbeat age by job id; without it they hold no tenant's data.
    """
    operator = is_operator(request)
    if request.app.state.settings.operator_token is not None and not operator:
        raise Unauthorized(
            "/metrics needs the operator token: send Authorization: Bearer <DISTILL_OPERATOR_TOKEN>"
        )
    registry = request.app.state.metrics.registry
    if operator:
        registry = request.app.state.metrics.operator_registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
