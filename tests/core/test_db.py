"""SQLite writers of one process take turns on a lock: none fails, none is left waiting.

Hot-path reads on PostgreSQL (autocommit, no pre-ping) survive a dropped connection.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from core.db import get_engine, get_read_engine, read_with_retry


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


def test_a_hot_read_survives_a_postgres_connection_that_was_dropped(postgres_url: str) -> None:
    engine = get_read_engine(postgres_url)
    pid = read_with_retry(engine, text("SELECT pg_backend_pid()"))[0]
    # What a database restart or an idle timeout does to a pooled connection.
    with get_engine(postgres_url).connect() as admin:
        admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    row = read_with_retry(engine, text("SELECT pg_backend_pid()"))
    assert row is not None and row[0] != pid  # answered on a new connection, no error
    with engine.connect() as conn:  # autocommit: a read leaves no transaction open
        conn.execute(text("SELECT 1"))
        assert conn.execute(text("SELECT now() = statement_timestamp()")).scalar() is True
