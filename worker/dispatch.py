"""Send a job id to the broker. Imported by the API: keep torch off this import path."""

from __future__ import annotations

import logging
import threading
from queue import SimpleQueue

from celery import Celery
from kombu import Producer

from core.models import Job

log = logging.getLogger(__name__)


def send_job(
    job_id: str, queue: str, *, app: Celery | None = None, producer: Producer | None = None
) -> None:
    """Put a job id on its queue (``distill.run_job``), through ``producer`` when given."""
    from worker.celery_app import RUN_JOB_TASK

    if app is None:
        from worker.celery_app import celery_app as app
    app.send_task(RUN_JOB_TASK, args=[job_id], queue=queue, producer=producer)


class JobSender:
    """Sends job ids to the broker from one background thread, so a request never waits on it.

    The job row is committed (``status=queued``, ``enqueued_at``) before its id is handed over,
    so a send that fails, or never happens because the process died, is covered by the
    reconciler, which re-sends queued jobs after ``requeue_after_seconds``.
    """

    def __init__(self, app: Celery | None = None) -> None:
        self._app = app
        self._pending: SimpleQueue[tuple[str, str] | None] = SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, job: Job) -> None:
        """Queue the job's id for sending; returns at once."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="job-sender", daemon=True)
                self._thread.start()
        self._pending.put((job.id, job.queue))

    def close(self, timeout: float = 10.0) -> None:
        """Send what is pending (waiting at most ``timeout`` seconds), then stop the thread."""
        with self._lock:
            thread = self._thread
        if thread is not None and thread.is_alive():
            self._pending.put(None)
            thread.join(timeout)

    def _run(self) -> None:
        app = self._app
        if app is None:
            from worker.celery_app import celery_app as app
        producer = None
        while (item := self._pending.get()) is not None:
            job_id, job_queue = item
            try:
                # One producer (and broker connection) for every send: acquiring one per message
                # costs as much as the send itself.
                producer = producer or app.producer_pool.acquire(block=True)
                send_job(job_id, job_queue, app=app, producer=producer)
            except Exception:  # noqa: BLE001 - any broker failure; the reconciler re-sends
                log.warning(
                    "could not send %s to the broker; the reconciler will retry",
                    job_id,
                    exc_info=True,
                )
                if producer is not None:
                    producer.release()
                    producer = None
        if producer is not None:
            producer.release()
