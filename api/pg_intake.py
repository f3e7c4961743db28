"""The job intake's statements on PostgreSQL, sent through psycopg's pipeline mode.

SQLAlchemy sends a statement and waits for its answer before the next: a batch of jobs made
seven round trips (BEGIN, two lookups, three inserts, COMMIT). After each, the intake thread
must win the GIL back from the event loop, and under load that wait, not the database, was
more than half of a batch's time. Pipelined, the lookups are one round trip and the inserts
with the COMMIT another. The rows and the checks are the intake's own (``api/job_intake.py``),
which sends the same statements through SQLAlchemy on every other database.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from psycopg import Connection as PgConnection
from psycopg.rows import namedtuple_row
from psycopg.types.json import Json
from sqlalchemy import Connection, Table

from core.models import Dataset, Model

_MODELS = (
    f"SELECT id, tenant_id, format, signature, trainable, arch FROM {Model.__tablename__} "
    "WHERE id = ANY(%s)"
)
_DATASETS = f"SELECT id, tenant_id, info FROM {Dataset.__tablename__} WHERE id = ANY(%s)"


def driver_connection(conn: Connection) -> PgConnection[Any] | None:
    """The psycopg connection under ``conn``; None on any other driver."""
    driver = conn.connection.driver_connection
    return driver if isinstance(driver, PgConnection) else None


def lookup_uploads(
    driver: PgConnection[Any], model_ids: Sequence[str], dataset_ids: Sequence[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The models and the datasets with these ids, by id, in one round trip."""
    with driver.pipeline():
        models = driver.cursor(row_factory=namedtuple_row).execute(_MODELS, (list(model_ids),))
        datasets = driver.cursor(row_factory=namedtuple_row).execute(
            _DATASETS, (list(dataset_ids),)
        )
        return {m.id: m for m in models.fetchall()}, {d.id: d for d in datasets.fetchall()}


def insert_and_commit(
    driver: PgConnection[Any], inserts: Sequence[tuple[Table, list[dict[str, Any]]]]
) -> None:
    """Each table's rows (in the order given: a row's parent first), then COMMIT, in one round
    trip. A unique key taken meanwhile raises ``psycopg.IntegrityError``."""
    with driver.pipeline():
        cursor = driver.cursor()
        for table, rows in inserts:
            if rows:
                cursor.executemany(_insert(table, rows[0]), [_adapted(row) for row in rows])
        driver.commit()


def _insert(table: Table, columns: Iterable[str]) -> str:
    names = list(columns)
    values = ", ".join(f"%({name})s" for name in names)
    return f"INSERT INTO {table.name} ({', '.join(names)}) VALUES ({values})"


def _adapted(row: dict[str, Any]) -> dict[str, Any]:
    # Every dict or list in these rows goes to a JSON column.
    return {k: Json(v) if isinstance(v, dict | list) else v for k, v in row.items()}
