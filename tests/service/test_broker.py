"""The embedded broker (kombu's SQLAlchemy transport with LeanChannel): order, one taker each,
and nothing left behind once a message is taken."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from queue import Empty

from core.config import Settings
from worker.celery_app import RUN_JOB_TASK, make_celery


def _send(tmp_path: Path, job_ids: list[str]):
    app = make_celery(Settings(data_dir=tmp_path))
    with app.connection_for_write() as conn:
        producer = conn.Producer()
        for job_id in job_ids:
            app.send_task(RUN_JOB_TASK, args=[job_id], queue="cpu", producer=producer)
    return app


def _take(app, queue: str = "cpu") -> list[str]:
    """Every message a consumer of its own gets from ``queue`` until it is empty."""
    taken = []
    with app.connection_for_read() as conn:
        channel = conn.default_channel
        while True:
            try:
                message = channel._get(queue)
            except Empty:
                return taken
            taken.append(message["headers"]["argsrepr"])


def test_messages_come_out_in_order_and_none_is_kept(tmp_path: Path) -> None:
    ids = [f"job_{i:03d}" for i in range(20)]
    app = _send(tmp_path, ids)
    assert _take(app) == [repr([i]) for i in ids]
    with sqlite3.connect(tmp_path / "broker.db") as db:
        assert db.execute("SELECT count(*) FROM kombu_message").fetchone() == (0,)


def test_two_consumers_never_take_the_same_message(tmp_path: Path) -> None:
    ids = [f"job_{i:03d}" for i in range(200)]
    _send(tmp_path, ids)
    results: list[list[str]] = [[], []]

    def consume(slot: int) -> None:
        results[slot] = _take(make_celery(Settings(data_dir=tmp_path)))

    threads = [threading.Thread(target=consume, args=(slot,)) for slot in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    first, second = results
    assert not set(first) & set(second)
    assert sorted(first + second) == sorted(repr([i]) for i in ids)


def test_a_publish_batch_is_written_when_it_ends_and_dropped_on_error(tmp_path: Path) -> None:
    app = _send(tmp_path, [])

    def stored() -> int:
        with sqlite3.connect(tmp_path / "broker.db") as db:
            return db.execute("SELECT count(*) FROM kombu_message").fetchone()[0]

    with app.connection_for_write() as conn:
        producer = conn.Producer()
        with producer.batch():
            for job_id in ("job_a", "job_b", "job_c"):
                app.send_task(RUN_JOB_TASK, args=[job_id], queue="cpu", producer=producer)
            assert stored() == 0
        assert stored() == 3
        try:
            with producer.batch():
                app.send_task(RUN_JOB_TASK, args=["job_d"], queue="cpu", producer=producer)
                raise RuntimeError("the sender failed mid-batch")
        except RuntimeError:
            pass
    assert _take(app) == [repr(["job_a"]), repr(["job_b"]), repr(["job_c"])]
