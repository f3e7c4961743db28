"""Prometheus metrics in a registry of the app's own: requests, latency, jobs, queue depth."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.jobs import RUNNING_STATUSES, TERMINAL_STATUSES
from core.logging import close_context, open_context
from core.models import JOB_STATUSES, Job, as_utc, utcnow

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


# Job run time, started → finished: seconds to a day.
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)


def _duration_seconds(dialect: str) -> Any:
    """SQL for ``finished_at - started_at`` in seconds on this database."""
    if dialect == "postgresql":
        return func.extract("epoch", Job.finished_at - Job.started_at)
    return (func.julianday(Job.finished_at) - func.julianday(Job.started_at)) * 86400.0


class JobTimesCollector(Collector):
    """Job durations and worker heartbeats, read from the database at scrape time.

    Any number of API and worker processes share one database, so these are correct for the
    whole deployment without Prometheus multiprocess mode.
    """

    def __init__(
        self, sessions: Callable[[], Session], stale_after_seconds: float, by_job: bool = False
    ) -> None:
        self.sessions = sessions
        self.stale_after = stale_after_seconds
        self.by_job = by_job  # each running job's heartbeat age, labelled by its id

    def describe(self) -> Iterator[Any]:
        durations, ages, stale, oldest = self._families()
        yield from (durations, ages, stale, oldest) if self.by_job else (durations, stale, oldest)

    def _families(self) -> tuple[Any, ...]:
        return (
            HistogramMetricFamily(
                "distill_job_duration_seconds",
                "Run time of finished jobs (started to finished), by final status.",
                labels=["status"],
            ),
            GaugeMetricFamily(
                "distill_job_heartbeat_age_seconds",
                "Seconds since each running job's worker last renewed its heartbeat.",
                labels=["job_id"],
            ),
            GaugeMetricFamily(
                "distill_jobs_stale_heartbeat",
                "Running jobs whose heartbeat is older than the lease (their worker may be gone).",
            ),
            GaugeMetricFamily(
                "distill_job_heartbeat_age_seconds_max",
                "The oldest heartbeat among running jobs, in seconds (0 when none run).",
            ),
        )

    def collect(self) -> Iterator[Any]:
        durations, ages, stale, oldest = self._families()
        try:
            with self.sessions() as session:
                finished = self._durations(session)
                beats = session.execute(
                    select(Job.id, Job.heartbeat_at, Job.started_at).where(
                        Job.status.in_(RUNNING_STATUSES)
                    )
                ).all()
        except Exception:  # noqa: BLE001 - a scrape must not fail because the database did
            log.warning("could not read job times for /metrics", exc_info=True)
            return
        for status, (buckets, total, seconds) in finished.items():
            durations.add_metric([status], [*buckets, ("+Inf", total)], seconds)
        now = utcnow()
        worst, n_stale = 0.0, 0
        for job_id, beat_at, started_at in beats:
            moment = beat_at or started_at
            if moment is None:
                continue
            age = max(0.0, (now - as_utc(moment)).total_seconds())
            ages.add_metric([job_id], age)
            worst = max(worst, age)
            n_stale += age > self.stale_after
        stale.add_metric([], n_stale)
        oldest.add_metric([], worst)
        yield from (durations, ages, stale, oldest) if self.by_job else (durations, stale, oldest)

    def _durations(self, session: Session) -> dict[str, tuple[list[tuple[str, int]], int, float]]:
        seconds = _duration_seconds(session.get_bind().dialect.name)
        columns = [func.sum(case((seconds <= b, 1), else_=0)) for b in DURATION_BUCKETS]
        rows = session.execute(
            select(Job.status, func.count(), func.coalesce(func.sum(seconds), 0.0), *columns)
            .where(
                Job.status.in_(TERMINAL_STATUSES),
                Job.started_at.is_not(None),
                Job.finished_at.is_not(None),
            )
            .group_by(Job.status)
        ).all()
        out = {}
        for status, count, total, *cumulative in rows:
            buckets = [
                (f"{float(b):g}", int(c or 0))
                for b, c in zip(DURATION_BUCKETS, cumulative, strict=True)
            ]
            out[status] = (buckets, int(count), float(total or 0.0))
        return out


class Metrics:
    """The app's registry and its request instruments."""

    def __init__(self, sessions: Callable[[], Session], stale_after_seconds: float = 30.0) -> None:
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
        jobs = JobsCollector(sessions)
        self.registry.register(jobs)
        self.registry.register(JobTimesCollector(sessions, stale_after_seconds))
        # The operator's view: the same, and each running job by id (api/routes/ops.py decides
        # who is the operator).
        self.operator_registry = CollectorRegistry(auto_describe=True)
        for collector in (self.requests, self.latency, jobs):
            self.operator_registry.register(collector)
        self.operator_registry.register(
            JobTimesCollector(sessions, stale_after_seconds, by_job=True)
        )


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
        # A fresh log context per request: dependencies add the tenant and job id to it (the
        # dict is shared with the threads that run them), and every line logged while the
        # request is served carries them, this middleware's own request line included.
        context = open_context()

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
            seconds = time.perf_counter() - start
            self.metrics.requests.labels(method, template, str(status)).inc()
            self.metrics.latency.labels(method, template).observe(seconds)
            log.info("%s %s %s %.1f ms", method, scope.get("path", ""), status, seconds * 1000)
            close_context(context)
