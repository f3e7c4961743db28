"""Job creation's statements on PostgreSQL: two statements per batch, sent by psycopg itself.

Through SQLAlchemy a batch of jobs made seven round trips (BEGIN, two lookups, three inserts,
COMMIT), and each round trip costs the creating thread more than the database's time: psycopg's
Python per statement and per value, and winning the GIL back from the event loop after the
wait. Here a batch sends two statements on an autocommit connection: one reads the models and
the datasets the specs name, one inserts every row of every table (an atomic statement, so no
BEGIN or COMMIT). The rows and the checks are job creation's own (``core/job_creation``); other
databases get the same rows through ``core/job_creation/dbapi.py``.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any, cast

import psycopg
from psycopg.rows import namedtuple_row
from psycopg.types.json import Json
from sqlalchemy import Connection, Table
from sqlalchemy.exc import DataError, IntegrityError

from core.models import Dataset, Model

# Models and datasets in one result; a dataset's row has no format.
_UPLOADS = (
    "SELECT id, tenant_id, format, signature, trainable, arch, parameters, NULL::json AS info "
    f"FROM {Model.__tablename__} WHERE id = ANY(%s) "
    "UNION ALL SELECT id, tenant_id, NULL, NULL, NULL, NULL, NULL, info "
    f"FROM {Dataset.__tablename__} WHERE id = ANY(%s)"
)


class PostgresStatements:
    """Job creation's statements sent through psycopg (see the module's docstring)."""

    integrity_errors = (IntegrityError, psycopg.IntegrityError)
    data_errors = (DataError, psycopg.DataError)

    def prepare(self, conn: Connection) -> Connection:
        # Each of a batch's two statements is atomic on its own.
        return conn.execution_options(isolation_level="AUTOCOMMIT")

    def read_uploads(
        self, conn: Connection, model_ids: Collection[str], dataset_ids: Collection[str]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The models and the datasets with these ids, by id, in one statement."""
        rows = (
            _driver(conn)
            .cursor(row_factory=namedtuple_row)
            .execute(_UPLOADS, (list(model_ids), list(dataset_ids)))
            .fetchall()
        )
        models = {row.id: row for row in rows if row.format is not None}
        datasets = {row.id: row for row in rows if row.format is None}
        return models, datasets

    def insert(
        self, conn: Connection, inserts: Sequence[tuple[Table, list[dict[str, Any]]]]
    ) -> None:
        """Every table's rows in one statement, committed (by itself on an autocommit
        connection). A unique key taken meanwhile raises ``psycopg.IntegrityError`` and stores
        nothing.

        Each table's rows go as one JSON array that the server expands into rows
        (``json_populate_recordset``): one value to send instead of one per column of each row,
        which in psycopg cost as much as the rest of a batch.
        """
        steps, params = [], []
        for table, rows in inserts:
            if rows:
                columns = ", ".join(f'"{name}"' for name in rows[0])
                steps.append(
                    f"{table.name}_in AS (INSERT INTO {table.name} ({columns}) SELECT {columns} "
                    f"FROM json_populate_recordset(NULL::{table.name}, %s))"
                )
                params.append(Json(rows, dumps=_dumps))
        driver = _driver(conn)
        if steps:
            # Foreign keys are checked at the end of the statement, when every table has its rows.
            driver.execute(f"WITH {', '.join(steps)} SELECT 1", params)
        driver.commit()  # nothing to do on an autocommit connection


def _driver(conn: Connection) -> psycopg.Connection[Any]:
    return cast("psycopg.Connection[Any]", conn.connection.driver_connection)


def _dumps(value: Any) -> str:
    return json.dumps(value, default=_isoformat, separators=(",", ":"))


def _isoformat(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot store {type(value).__name__} in JSON")
