"""What job creation asks of the database driver, and the one implementation for a database.

Job creation's statements go straight to the driver (SQLAlchemy's Python per statement cost
more than the database did): psycopg's own on PostgreSQL (``postgres.py``), the DBAPI cursor
elsewhere (``dbapi.py``). Which one serves an engine is decided once, by its dialect.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any, Protocol

from sqlalchemy import Connection, Table
from sqlalchemy.engine import Dialect

from core.job_creation.dbapi import DbapiStatements
from core.job_creation.postgres import PostgresStatements

# A table and the rows to insert into it.
Inserts = Sequence[tuple[Table, list[dict[str, Any]]]]


class JobStatements(Protocol):
    """Job creation's reads and writes on one database driver."""

    # A unique or foreign key refused a row: raised by SQLAlchemy or by the driver itself.
    integrity_errors: tuple[type[Exception], ...]
    # A value the database refuses to store (PostgreSQL's class 22, "data exception").
    data_errors: tuple[type[Exception], ...]

    def prepare(self, conn: Connection) -> Connection:
        """The connection as these statements want it (once per connection checked out)."""
        ...

    def read_uploads(
        self, conn: Connection, model_ids: Collection[str], dataset_ids: Collection[str]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The models and the datasets with these ids, by id (rows with the columns that
        checking a spec reads: ``dbapi.MODEL_COLUMNS``, ``dbapi.DATASET_COLUMNS``)."""
        ...

    def insert(self, conn: Connection, inserts: Inserts) -> None:
        """Each table's rows, in the order given (a row's parent first)."""
        ...


def statements_for(dialect: Dialect) -> JobStatements:
    """The statements for an engine's database: psycopg's own on PostgreSQL, else the DBAPI's."""
    if dialect.name == "postgresql" and dialect.driver == "psycopg":
        return PostgresStatements()
    return DbapiStatements(dialect)
