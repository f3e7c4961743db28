"""SQLite writers of one process take turns on a lock: none fails, none is left waiting."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from core.db import get_engine


@pytest.fixture
def engine(tmp_path: Path):
    engine = get_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)"))
    yield engine
    engine.dispose()


def test_concurrent_writers_in_one_process_all_commit(engine) -> None:
    errors: list[BaseException] = []

    def write(worker: int) -> None:
        try:
            for i in range(25):
                with engine.begin() as conn:
                    conn.execute(text("SELECT count(*) FROM t")).scalar()  # a read first
                    conn.execute(text("INSERT INTO t (v) VALUES (:v)"), {"v": f"{worker}-{i}"})
                    conn.execute(
                        text("UPDATE t SET v = v || '!' WHERE v = :v"), {"v": f"{worker}-{i}"}
                    )
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM t WHERE v LIKE '%!'")).scalar() == 300


def test_a_failed_write_transaction_lets_the_next_writer_in(engine) -> None:
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO t (id, v) VALUES (1, 'a')"))
    with pytest.raises(IntegrityError), engine.begin() as conn:
        conn.execute(text("INSERT INTO t (id, v) VALUES (2, 'b')"))
        conn.execute(text("INSERT INTO t (id, v) VALUES (1, 'again')"))  # rolled back
    done = threading.Event()

    def other_writer() -> None:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO t (id, v) VALUES (3, 'c')"))
        done.set()

    threading.Thread(target=other_writer).start()
    assert done.wait(10), "the rolled-back transaction kept the write lock"
    with engine.connect() as conn:
        assert conn.execute(text("SELECT id FROM t ORDER BY id")).scalars().all() == [1, 3]
