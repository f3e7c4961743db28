"""Alembic environment: the database URL comes from distill's settings, the tables from core.models.

``core.schema.upgrade_database(url)`` passes its URL in ``config.attributes["url"]``; running
``alembic`` by hand uses ``DISTILL_DATABASE_URL`` (or the embedded SQLite default).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from core.config import Settings
from core.db import get_engine
from core.models import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    return config.attributes.get("url") or Settings().database


def _configure(**kw: object) -> None:
    url = _url()
    context.configure(
        target_metadata=target_metadata,
        compare_type=True,
        # SQLite can't ALTER most things; batch mode rebuilds the table instead.
        render_as_batch=url.startswith("sqlite"),
        **kw,
    )


def run_migrations_offline() -> None:
    _configure(url=_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection: Connection | None = config.attributes.get("connection")
    if connection is not None:
        _configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    with get_engine(_url()).connect() as connection:
        _configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
