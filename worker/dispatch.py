"""Send a job id to the broker. Imported by the API: keep torch off this import path."""

from __future__ import annotations

import logging

from celery import Celery
from kombu import Producer
from kombu.utils.uuid import uuid

from core.batching import BatchingThread
from core.models import Job

log = logging.getLogger(__name__)


def send_job(
    job_id: str,
    queue: str,
    *,
    app: Celery | None = None,
    producer: Producer | None = None,
    declare: bool = True,
    retry: bool = True,
) -> None:
    """Put a job id on its queue (``distill.run_job``), through ``producer`` when given.

    ``declare=False`` skips declaring the queue, for a producer that has declared it already;
    ``retry=False`` skips Celery's publish retries (a batched publish only buffers, so there is
    nothing to retry until the batch is flushed).
    """
    from worker.celery_app import RUN_JOB_TASK

    if app is None:
        from worker.celery_app import celery_app as app
    # The message ``app.send_task`` would build, without its per-call option merging and
    # routing (half of a batched send's CPU): the job's queue is known and routed by name.
    args = [job_id]
    message = app.amqp.as_task_v2(
        uuid(),
        RUN_JOB_TASK,
        args=args,
        kwargs={},
        argsrepr=repr(args),
        kwargsrepr="{}",
        ignore_result=None,  # the task's own setting decides, as with send_task
    )
    with app.producer_or_acquire(producer) as held:
        app.amqp.send_task_message(
            held,
            RUN_JOB_TASK,
            message,
            queue=queue,
            declare=None if declare else [],
            retry=retry,
            reply_to=app.thread_oid,
        )


class JobSender(BatchingThread[tuple[str, str]]):
    """Sends job ids to the broker from one background thread, so a request never waits on it.

    The job row is committed (``status=queued``, ``enqueued_at``) before its id is handed over,
    so a send that fails, or never happens because the process died, is covered by the
    reconciler, which re-sends queued jobs after ``requeue_after_seconds``.
    """

    name = "job-sender"
    # Under load: per job, a send in a batch costs half as much as a send alone, and a job
    # waits at most this long more for a worker (the database has it, the client its answer).
    linger_seconds = 0.02

    def __init__(self, app: Celery | None = None) -> None:
        super().__init__()
        self._app = app
        self._producer: Producer | None = None
        self._declared: set[str] = set()  # queues declared through this producer

    def submit(self, job: Job) -> None:
        """Queue the job's id for sending; returns at once."""
        self.put((job.id, job.queue))

    def handle(self, batch: list[tuple[str, str]]) -> None:
        if self._app is None:
            from worker.celery_app import celery_app

            self._app = celery_app
        try:
            # One producer (and broker connection) for every send: acquiring one per message
            # costs as much as the send itself.
            producer = self._producer = self._producer or self._app.producer_pool.acquire(
                block=True
            )
            # What is pending goes out as one broker write (a Redis pipeline, one insert on the
            # embedded broker): per job, that is most of what a send costs.
            with producer.batch(max_size=self.batch_size):
                for job_id, job_queue in batch:
                    declare = job_queue not in self._declared
                    send_job(
                        job_id,
                        job_queue,
                        app=self._app,
                        producer=producer,
                        declare=declare,
                        retry=False,
                    )
                    self._declared.add(job_queue)
        except Exception:  # noqa: BLE001 - any broker failure; the reconciler re-sends
            log.warning(
                "could not send %s to the broker; the reconciler will retry",
                ", ".join(job_id for job_id, _ in batch),
                exc_info=True,
            )
            self.release()

    def release(self) -> None:
        if self._producer is not None:
            self._producer.release()
            self._producer = None
        self._declared.clear()
