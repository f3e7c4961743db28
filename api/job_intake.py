"""The API's job intake: ``POST /v1/jobs`` requests batched on a thread of their own.

``POST /v1/jobs`` is the API's busiest write. A request hands its body to :class:`JobIntake`,
one thread per API process that creates all the jobs waiting for it at once
(``core/job_creation``): under load, a commit and each statement's round trip are shared by
many jobs instead of each job paying for its own.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from contextlib import suppress

from sqlalchemy import Connection, Engine

from core.batching import BatchingThread
from core.config import Settings
from core.job_creation import JobRequest, StoredJob, create_jobs, statements_for


class JobIntake(BatchingThread[tuple[JobRequest, "Future[StoredJob]"]]):
    """Creates jobs on a thread of its own, all that wait in one transaction (group commit)."""

    name = "job-intake"
    # A connection idle this long is checked out of the pool again (which pings it) before use;
    # under load the thread keeps one, saving a checkout and a round trip per batch.
    recheck_after_seconds = 1.0

    def __init__(self, engine: Engine, settings: Settings) -> None:
        super().__init__()
        self._engine = engine
        self._settings = settings
        self.statements = statements_for(engine.dialect)
        self._conn: Connection | None = None
        self._last_used = 0.0

    def submit(self, request: JobRequest) -> Future[StoredJob]:
        """The job this request makes (or replays), or the error that says why not."""
        future: Future[StoredJob] = Future()
        self.put((request, future))
        return future

    def handle(self, batch: list[tuple[JobRequest, Future[StoredJob]]]) -> None:
        try:
            conn = self._connection()
            answers = create_jobs(
                conn, self.statements, [request for request, _ in batch], self._settings
            )
        except Exception as exc:  # noqa: BLE001 - e.g. the database is down: each request says so
            self.release()
            answers = [exc] * len(batch)
        for (_, future), answer in zip(batch, answers, strict=True):
            if isinstance(answer, Exception):
                future.set_exception(answer)
            else:
                future.set_result(answer)

    def _connection(self) -> Connection:
        now = time.monotonic()
        if self._conn is not None and now - self._last_used > self.recheck_after_seconds:
            self.release()
        if self._conn is None:
            self._conn = self.statements.prepare(self._engine.connect())
        self._last_used = now
        return self._conn

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with suppress(Exception):  # a broken connection is discarded all the same
                conn.close()
