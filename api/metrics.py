"""Prometheus metrics in a registry of the app's own: requests, latency, jobs, queue depth."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.models import JOB_STATUSES, Job

log = logging.getLogger("distill.api")


class JobsCollector(Collector):
    """Reads job counts from the database at scrape time (the database is the truth)."""

    def __init__(self, sessions: Callable[[], Session]) -> None:
        self.sessions = sessions

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # Registering must not query the database (it may not exist yet).
        yield GaugeMetricFamily("distill_jobs", "Jobs by status.", labels=["status"])
        yield GaugeMetricFamily(
            "distill_queue_depth", "Jobs waiting for a worker, by queue.", labels=["queue"]
        )

    def collect(self) -> Iterator[GaugeMetricFamily]:
        jobs = GaugeMetricFamily("distill_jobs", "Jobs by status.", labels=["status"])
        depth = GaugeMetricFamily(
            "distill_queue_depth", "Jobs waiting for a worker, by queue.", labels=["queue"]
        )
        try:
            with self.sessions() as session:
                by_status = dict(
                    session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
                )
                by_queue = dict(
                    session.execute(
                        select(Job.queue, func.count())
                        .where(Job.status == "queued")
                        .group_by(Job.queue)
                    ).all()
                )
        except Exception:  # noqa: BLE001 - a scrape must not fail because the database did
            log.warning("could not read job counts for /metrics", exc_info=True)
            return
        for status in JOB_STATUSES:
            jobs.add_metric([status], by_status.get(status, 0))
        for queue in sorted({"cpu", "gpu", *by_queue}):
            depth.add_metric([queue], by_queue.get(queue, 0))
        yield jobs
        yield depth


class Metrics:
    """The app's registry and its request instruments."""

    def __init__(self, sessions: Callable[[], Session]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "distill_http_requests",
            "HTTP requests by method, route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "distill_http_request_duration_seconds",
            "Time to the end of the response, by method and route template.",
            ["method", "route"],
            registry=self.registry,
        )
        self.registry.register(JobsCollector(sessions))


class MetricsMiddleware:
    """Counts every HTTP request under its route template (``/v1/jobs/{job_id}``)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            # Unmatched paths share one label so that scanners can't blow up the series count.
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "GET")
            self.metrics.requests.labels(method, template, str(status)).inc()
            self.metrics.latency.labels(method, template).observe(time.perf_counter() - start)
