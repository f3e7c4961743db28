"""The app factory: settings, database, storage, routers, error handlers and metrics."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.types import ASGIApp

from api.dashboard import routes as dashboard
from api.errors import install_error_handlers
from api.hot_routes import HotRoutes
from api.job_intake import JobIntake
from api.metrics import Metrics, MetricsMiddleware
from api.routes import artifacts, datasets, jobs, models, ops, searches
from api.tenants import TenantResolver
from core.config import Settings, get_settings, warn_about_isolation
from core.db import get_engine, get_read_engine, session_factory
from core.distill.inspect import keep_inspection_warm
from core.distill.sandbox import stop_warm
from core.logging import configure_logging
from core.spec import JobSpec
from core.storage import get_storage

DESCRIPTION = """Distillation as a service: upload a teacher and a transfer set, start a job,
get back a small, fast, measured student.

Authenticate with `Authorization: Bearer <key>`. Errors are
`{"error": {"code", "message", "details"}}`."""


def create_app(settings: Settings | None = None) -> FastAPI:
    """A configured API app (settings default to the environment's, and then logging too)."""
    server_process = settings is None  # uvicorn --factory, not an app made in a test
    if server_process:
        _configure_server_logging()
    settings = settings or get_settings()
    app = DistillAPI(title="distill", version="1", description=DESCRIPTION, lifespan=_lifespan)
    app.state.freeze_gc = server_process
    app.state.settings = settings
    app.state.sessions = session_factory(settings.database)
    app.state.job_intake = JobIntake(get_engine(settings.database), settings)
    app.state.read_engine = get_read_engine(settings.database)
    app.state.storage = get_storage(settings.storage, s3_endpoint_url=settings.s3_endpoint_url)
    app.state.tenants = TenantResolver(
        app.state.sessions, auth=settings.auth == "on", ttl=settings.auth_cache_seconds
    )
    # Seams: tests swap how jobs reach the broker and what /readyz asks.
    app.state.job_sender = None
    app.state.enqueue = lambda job: _job_sender(app).submit(job)
    app.state.readiness_checks = ops.default_checks(settings, app.state.storage)
    app.state.metrics = Metrics(app.state.sessions, stale_after_seconds=settings.lease_seconds)

    install_error_handlers(app)
    for module in (models, datasets, jobs, searches, artifacts, ops):
        app.include_router(module.router)
    dashboard.install(app)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


class DistillAPI(FastAPI):
    """FastAPI, with the request metrics and the hot routes outside its own middleware."""

    def build_middleware_stack(self) -> ASGIApp:
        # Every request is counted and logged first. The two busiest routes are then answered
        # before FastAPI's error, telemetry and body-limit layers, which cost them more CPU than
        # their own work; HotRoutes answers their errors itself, in the same envelope.
        stack = HotRoutes(super().build_middleware_stack(), api=self)
        return MetricsMiddleware(stack, metrics=self.state.metrics)


def _job_sender(app: FastAPI) -> Any:
    if app.state.job_sender is None:
        # The broker client is only needed once a job comes.
        from worker.celery_app import make_celery
        from worker.dispatch import JobSender

        app.state.job_sender = JobSender(make_celery(app.state.settings))
    return app.state.job_sender


def _configure_server_logging() -> None:
    configure_logging(background=True)
    # MetricsMiddleware logs one line per request, with its duration, tenant and job id;
    # uvicorn's access line would say the same again at the same cost.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = app.state.settings
    warn_about_isolation(settings, logging.getLogger("distill.api"))
    if settings.warm_sandbox:
        # A new interpreter importing torch: seconds saved per upload.
        keep_inspection_warm(settings.isolation)
    # What exists now (modules, the app, the engine) lives as long as the process. Left to the
    # collector, each full collection walks all of it: tens of milliseconds during which no
    # request is served. Frozen objects are never scanned.
    if app.state.freeze_gc:
        _job_sender(app)  # import the broker client now, to be frozen with the rest
        gc.collect()
        gc.freeze()
    yield
    stop_warm()
    app.state.job_intake.close()
    if app.state.job_sender is not None:  # send what is pending before the process ends
        app.state.job_sender.close()


def app_from_env() -> FastAPI:
    """The app for this environment's settings (``uvicorn --factory api.main:app_from_env``)."""
    return create_app()


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus the job spec (the body of POST /v1/jobs is parsed by core.spec)."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    spec = JobSpec.model_json_schema(ref_template="#/components/schemas/{model}")
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(spec.pop("$defs", {}))
    components["JobSpec"] = spec
    for item in schema["paths"].values():
        for operation in item.values():
            content = operation.get("requestBody", {}).get("content", {})
            body = content.get("application/json", {}).get("schema", {})
            if "$ref" in body:  # openapi_extra merged into the generated schema: keep the ref
                content["application/json"]["schema"] = {"$ref": body["$ref"]}
    app.openapi_schema = schema
    return schema
