"""Database engine and sessions (SQLAlchemy 2.0), shared by the API, the worker and the CLI."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

from sqlalchemy import Engine, Executable, Row, create_engine, event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker


@event.listens_for(Engine, "connect")
def _sqlite_pragmas(dbapi_connection: object, _record: object) -> None:
    """Tune every SQLite connection in the process: ours and the SQLite broker transport's."""
    if not isinstance(dbapi_connection, sqlite3.Connection):
        return
    cur = dbapi_connection.cursor()
    # WAL lets readers and one writer work at once; NORMAL never corrupts a WAL database, it
    # only skips the fsync per commit (which made each broker message cost milliseconds).
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


_WRITE_WORDS = ("INSERT", "UPDATE", "DELETE", "REPLACE")
BUSY_TIMEOUT_SECONDS = 30
_write_locks: dict[str, threading.Lock] = {}
_write_locks_guard = threading.Lock()


class _QueuedWriter(sqlite3.Connection):
    """A SQLite connection whose write transactions queue on a lock shared by the process.

    SQLite lets one writer in at a time; the others wait in its busy handler, which sleeps
    1-100 ms between tries, so under concurrent requests a write can wait far longer than the
    writes ahead of it took. Threads of one process instead wait on this lock, first come first
    served. (Other processes, the workers, still meet the busy handler; they write rarely.)
    """

    write_lock: threading.Lock
    holds_write_lock = False

    def cursor(self, factory: Any = None) -> sqlite3.Cursor:
        return super().cursor(factory or _QueuedWriterCursor)

    def commit(self) -> None:
        try:
            super().commit()
        finally:
            self.release_write_lock()

    def rollback(self) -> None:
        try:
            super().rollback()
        finally:
            self.release_write_lock()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.release_write_lock()

    def take_write_lock(self, sql: str) -> None:
        # sqlite3 opens a transaction at the first data-changing statement, not at a SELECT:
        # the lock covers exactly the span in which this connection holds SQLite's write lock.
        if not self.holds_write_lock and sql.lstrip()[:7].upper().startswith(_WRITE_WORDS):
            # The same bound as SQLite's own busy timeout, and the same error past it.
            if not self.write_lock.acquire(timeout=BUSY_TIMEOUT_SECONDS):
                raise sqlite3.OperationalError("database is locked")
            self.holds_write_lock = True

    def release_write_lock(self) -> None:
        if self.holds_write_lock and not self.in_transaction:
            self.holds_write_lock = False
            self.write_lock.release()


class _QueuedWriterCursor(sqlite3.Cursor):
    connection: _QueuedWriter

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        self.connection.take_write_lock(sql)
        try:
            return super().execute(sql, parameters)
        finally:
            self.connection.release_write_lock()  # only if no transaction remains open

    def executemany(self, sql: str, seq_of_parameters: Any, /) -> sqlite3.Cursor:
        self.connection.take_write_lock(sql)
        try:
            return super().executemany(sql, seq_of_parameters)
        finally:
            self.connection.release_write_lock()


def _sqlite_engine(url: str) -> Engine:
    engine = create_engine(
        url,
        connect_args={
            "check_same_thread": False,
            "timeout": BUSY_TIMEOUT_SECONDS,
            "factory": _QueuedWriter,
        },
        # Every request thread may hold a connection; reconnecting (and the pragmas) per
        # request would cost more than the query.
        pool_size=20,
        max_overflow=40,
    )
    with _write_locks_guard:
        lock = _write_locks.setdefault(str(engine.url.database), threading.Lock())

    @event.listens_for(engine, "connect")
    def _share_write_lock(dbapi_connection: _QueuedWriter, _record: object) -> None:
        dbapi_connection.write_lock = lock

    return engine


@lru_cache(maxsize=8)
def get_engine(url: str) -> Engine:
    """One engine per database URL per process."""
    if url.startswith("sqlite"):
        return _sqlite_engine(url)
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


@lru_cache(maxsize=8)
def get_read_engine(url: str) -> Engine:
    """An engine for single-statement reads on a hot path (PostgreSQL: autocommit, no ping).

    Autocommit saves the BEGIN and ROLLBACK around the statement, and going without the
    pool's pre-ping saves a third round trip; use it with :func:`read_with_retry`, which
    retries once on a fresh connection when the pooled one turns out dead. SQLite reads need
    neither, so it is the ordinary engine there.
    """
    if url.startswith("sqlite"):
        return get_engine(url)
    return create_engine(url, isolation_level="AUTOCOMMIT", pool_size=10, max_overflow=20)


def read_with_retry(engine: Engine, statement: Executable) -> Row[Any] | None:
    """The first row of a read-only ``statement``; retried once if the connection was dead.

    A dead connection (the database restarted) invalidates the whole pool, so the retry
    gets a new connection; any other error is raised as it is.
    """
    try:
        return _first_row(engine, statement)
    except DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
    return _first_row(engine, statement)


def _first_row(engine: Engine, statement: Executable) -> Row[Any] | None:
    with engine.connect() as conn:
        return conn.execute(statement).first()


def session_factory(url: str) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = session_factory(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
