"""Job creation's statements on SQLite (any database but PostgreSQL), sent to the DBAPI cursor.

Through SQLAlchemy's Core a statement costs 150-230 µs of Python (an execution context, each
parameter processed, a result object): more than SQLite takes to run it, and paid by every
batch of jobs created. Here each statement is rendered once per dialect and shape, and
every value is converted by the dialect's own type processors, so what is stored reads back
through SQLAlchemy exactly as if SQLAlchemy had written it. PostgreSQL has its own path
(``core/job_creation/postgres.py``).
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable, Collection, Sequence
from functools import lru_cache
from typing import Any

from sqlalchemy import Column, Connection, Table, bindparam, select
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DataError, IntegrityError

from core.models import Dataset, Model

Processor = Callable[[Any], Any] | None
# Positional paramstyles only: the values go in as tuples.
_PLACEHOLDERS = {"qmark": "?", "format": "%s"}
# What checking a spec reads of the uploads it names.
MODEL_COLUMNS = ("id", "tenant_id", "format", "signature", "trainable", "arch", "parameters")
DATASET_COLUMNS = ("id", "tenant_id", "info")


class DbapiStatements:
    """Job creation's statements sent to the DBAPI cursor (see the module's docstring); the
    caller commits."""

    def __init__(self, dialect: Dialect) -> None:
        driver = dialect.loaded_dbapi
        self.integrity_errors = (IntegrityError, driver.IntegrityError)
        self.data_errors = (DataError, driver.DataError)

    def prepare(self, conn: Connection) -> Connection:
        return conn

    def read_uploads(
        self, conn: Connection, model_ids: Collection[str], dataset_ids: Collection[str]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The models and the datasets with these ids, by id: one query each."""
        models = _rows_by_id(conn, Model.__table__, MODEL_COLUMNS, list(model_ids))
        datasets = _rows_by_id(conn, Dataset.__table__, DATASET_COLUMNS, list(dataset_ids))
        return models, datasets

    def insert(
        self, conn: Connection, inserts: Sequence[tuple[Table, list[dict[str, Any]]]]
    ) -> None:
        _insert_rows(conn, inserts)


def _insert_rows(conn: Connection, inserts: Sequence[tuple[Table, list[dict[str, Any]]]]) -> None:
    """Each table's rows (in the order given: a row's parent first), one executemany each, in
    the connection's transaction (the caller commits)."""
    cursor = conn.connection.driver_connection.cursor()
    try:
        for table, rows in inserts:
            if rows:
                sql, columns, processors = _insert(conn.dialect, table, tuple(rows[0]))
                cursor.executemany(sql, [_values(row, columns, processors) for row in rows])
    finally:
        cursor.close()


def _rows_by_id(
    conn: Connection, table: Table, columns: Sequence[str], ids: Sequence[str]
) -> dict[str, Any]:
    """The rows of ``table`` with these ids (named tuples of ``columns``, ``id`` first), by id."""
    if not ids:
        return {}
    sql, row_type, processors = _select(conn.dialect, table, tuple(columns), len(ids))
    cursor = conn.connection.driver_connection.cursor()
    try:
        fetched = cursor.execute(sql, list(ids)).fetchall()
    finally:
        cursor.close()
    rows = (
        row_type(*(v if p is None else p(v) for v, p in zip(raw, processors, strict=True)))
        for raw in fetched
    )
    return {row.id: row for row in rows}


@lru_cache(maxsize=32)
def _insert(
    dialect: Dialect, table: Table, columns: tuple[str, ...]
) -> tuple[str, tuple[str, ...], tuple[Processor, ...]]:
    quote = dialect.identifier_preparer
    placeholders = ", ".join(_PLACEHOLDERS[dialect.paramstyle] for _ in columns)
    sql = (
        f"INSERT INTO {quote.format_table(table)} ({', '.join(map(quote.quote, columns))}) "
        f"VALUES ({placeholders})"
    )
    processors = tuple(_type(table.c[name], dialect).bind_processor(dialect) for name in columns)
    return sql, columns, processors


@lru_cache(maxsize=256)
def _select(
    dialect: Dialect, table: Table, names: tuple[str, ...], count: int
) -> tuple[str, Any, tuple[Processor, ...]]:
    # One placeholder per id: rendered for each batch size met (a batch holds at most 200).
    statement = select(*(table.c[name] for name in names)).where(
        table.c.id.in_([bindparam(f"id{i}") for i in range(count)])
    )
    processors = tuple(
        _type(table.c[name], dialect).result_processor(dialect, None) for name in names
    )
    return str(statement.compile(dialect=dialect)), namedtuple(table.name, names), processors


def _type(column: Column[Any], dialect: Dialect) -> Any:
    return column.type.dialect_impl(dialect)


def _values(
    row: dict[str, Any], columns: tuple[str, ...], processors: tuple[Processor, ...]
) -> tuple:
    return tuple(
        row[c] if p is None else p(row[c]) for c, p in zip(columns, processors, strict=True)
    )
