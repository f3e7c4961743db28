"""Migrations: upgrade → downgrade → upgrade, and the migrated schema matches core/models.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from typer.testing import CliRunner

from client.cli import app as cli
from core.db import get_engine
from core.models import Base
from core.schema import (
    alembic_config,
    current_revision,
    downgrade_database,
    upgrade_database,
)
from tests.conftest import POSTGRES_URL, require_service
from tests.service.helpers import fresh_postgres


def _differences(url: str) -> list[object]:
    with get_engine(url).connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return compare_metadata(context, Base.metadata)


def _tables(url: str) -> set[str]:
    return set(inspect(get_engine(url)).get_table_names()) - {"alembic_version"}


def _round_trip(url: str) -> None:
    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    upgrade_database(url)
    assert current_revision(url) == head
    assert _tables(url) == set(Base.metadata.tables)
    assert _differences(url) == []

    downgrade_database(url, "base")
    assert current_revision(url) is None
    assert _tables(url) == set()

    upgrade_database(url)
    upgrade_database(url)  # idempotent at head
    assert current_revision(url) == head
    assert _differences(url) == []


def test_round_trip_on_postgres() -> None:
    require_service("PostgreSQL", "127.0.0.1", 5432)
    with fresh_postgres(POSTGRES_URL) as url:
        _round_trip(url)


def test_round_trip_on_sqlite(tmp_path: Path) -> None:
    _round_trip(f"sqlite:///{tmp_path / 'distill.db'}")


def test_revisions_form_one_dated_line() -> None:
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    assert len(script.get_heads()) == 1
    for revision in script.walk_revisions():
        name = Path(revision.path).name
        assert name[:10].replace("_", "").isdigit(), f"{name} is not date-prefixed"


def test_db_upgrade_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    monkeypatch.setenv("DISTILL_DATABASE_URL", url)
    result = CliRunner().invoke(cli, ["db", "upgrade"])
    assert result.exit_code == 0, result.output
    assert "0001" in result.stdout
    assert _tables(url) == set(Base.metadata.tables)
    result = CliRunner().invoke(cli, ["db", "downgrade", "base", "--yes"])
    assert result.exit_code == 0, result.output
    assert _tables(url) == set()
