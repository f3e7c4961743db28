"""The Celery app, configured from :class:`core.config.Settings`.

The broker only carries job ids; the database is the truth (docs/ARCHITECTURE.md), so there is
no result backend. Queues: ``cpu`` and ``gpu`` for jobs, ``control`` for the reconciler, so that
reconciliation never waits behind a long job.
"""

from __future__ import annotations

import logging
import sys
from contextlib import suppress
from typing import Any

from celery import Celery
from celery.signals import after_setup_logger, task_postrun, task_prerun, worker_ready
from kombu import Exchange, Queue

import core.db  # noqa: F401  (tunes SQLite connections, the broker transport's included)
from core.config import Settings, get_settings, warn_about_isolation
from core.logging import close_context, format_root_handlers, open_context

JOB_QUEUES = ("cpu", "gpu")
CONTROL_QUEUE = "control"
RUN_JOB_TASK = "distill.run_job"
RECONCILE_TASK = "distill.reconcile"

# Redis hands an unacknowledged message to another worker after this long. It must outlast the
# longest job (training.max_minutes <= 7 days); losing a message is covered by the reconciler.
VISIBILITY_TIMEOUT_SECONDS = 8 * 24 * 3600
# The serverless transports poll; the default of 1 s puts a second on every round trip.
POLLING_INTERVAL_SECONDS = 0.1


def _serverless_broker(url: str) -> bool:
    return url.startswith(("sqla+", "sqlalchemy+", "filesystem:"))


def _queue(name: str) -> Queue:
    # Each queue its own exchange and key: a bare Queue(name) would bind to the default queue's
    # exchange and key, and receive copies of the messages meant for that queue.
    return Queue(name, Exchange(name, type="direct"), routing_key=name)


def make_celery(settings: Settings | None = None) -> Celery:
    """A Celery app for these settings (the module-level ``celery_app`` uses the environment)."""
    settings = settings or get_settings()
    broker = settings.broker
    transport_options: dict[str, object] = {}
    if broker.startswith(("redis:", "rediss:")):
        transport_options["visibility_timeout"] = VISIBILITY_TIMEOUT_SECONDS
    # The beat schedule file, the job work folders and the embedded broker live here.
    with suppress(OSError):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    if _serverless_broker(broker):
        if broker.startswith(("sqla+", "sqlalchemy+")):
            # Passing polling_interval in broker_transport_options crashes this transport (it
            # hands every option to create_engine), so set it on the class.
            from kombu.transport.sqlalchemy import Transport

            from worker.broker import use_lean_channel

            Transport.polling_interval = POLLING_INTERVAL_SECONDS
            use_lean_channel()
        else:
            transport_options["polling_interval"] = POLLING_INTERVAL_SECONDS

    app = Celery("distill", broker=broker, include=["worker.tasks"])
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        result_backend=None,
        task_ignore_result=True,
        task_queues=[_queue(name) for name in (*JOB_QUEUES, CONTROL_QUEUE)],
        task_default_queue="cpu",
        task_routes={RECONCILE_TASK: {"queue": CONTROL_QUEUE}},
        # A job message is acknowledged only after the job ended; a worker that dies mid-job
        # leaves it for redelivery, and the database lease makes a second delivery harmless.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        beat_schedule={
            "reconcile": {
                "task": RECONCILE_TASK,
                "schedule": settings.reconcile_seconds,
                # A reconcile that waited longer than one period is superseded by the next one.
                "options": {"queue": CONTROL_QUEUE, "expires": settings.reconcile_seconds},
            }
        },
        beat_schedule_filename=str(settings.data_dir / "celerybeat-schedule"),
        timezone="UTC",
    )
    return app


celery_app = make_celery()
_log_tokens: dict[str, Any] = {}


@after_setup_logger.connect
def _log_format(**_: object) -> None:
    # Celery installs its own handlers; give them distill's format (DISTILL_LOG_FORMAT=json) and
    # the job context.
    format_root_handlers()


@worker_ready.connect
def _warn_about_isolation(**_: object) -> None:
    warn_about_isolation(get_settings(), logging.getLogger("distill.worker"))


@task_prerun.connect
def _job_log_context(task_id: str, task: object, args: tuple[object, ...], **_: object) -> None:
    # Every log line of a job task carries its job_id (the runner adds the tenant).
    if getattr(task, "name", None) == RUN_JOB_TASK and args:
        _log_tokens[task_id] = open_context(job_id=str(args[0]))


@task_postrun.connect
def _end_job_log_context(task_id: str, **_: object) -> None:
    token = _log_tokens.pop(task_id, None)
    if token is not None:
        close_context(token)


def worker_argv(queues: list[str], concurrency: int = 1, loglevel: str = "INFO") -> list[str]:
    """Celery arguments of a job worker (``distill worker``)."""
    # A thread pool: every task spends its time waiting on its own spawned job process (which is
    # where the CPU/GPU work and any crash happen), so threads are enough, start fast, and keep
    # one light parent per worker instead of a prefork child per slot.
    return [
        "worker",
        "--queues",
        ",".join(queues),
        "--pool",
        "threads",
        "--concurrency",
        str(concurrency),
        "--loglevel",
        loglevel,
        "--hostname",
        f"distill-{'-'.join(queues)}-%i@%h",
        "--without-gossip",
        "--without-mingle",
    ]


def control_argv(loglevel: str = "INFO") -> list[str]:
    """Celery arguments of the reconciler: beat plus a solo worker on the control queue."""
    return [
        "worker",
        "--beat",
        "--queues",
        CONTROL_QUEUE,
        "--pool",
        "solo",
        "--loglevel",
        loglevel,
        "--hostname",
        "distill-control-%i@%h",
        "--without-gossip",
        "--without-mingle",
    ]


def celery_command(argv: list[str]) -> list[str]:
    """A command line that runs Celery with this app and ``argv`` (light: no torch import)."""
    return [sys.executable, "-m", "celery", "-A", "worker.celery_app", *argv]
