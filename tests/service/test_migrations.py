"""Migrations: upgrade → downgrade → upgrade, and the migrated schema matches core/models.py."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import MetaData, inspect, text
from sqlalchemy.exc import IntegrityError
from typer.testing import CliRunner

from cli.app import app as cli
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
    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    assert f"revision {head}" in result.stdout
    assert _tables(url) == set(Base.metadata.tables)
    result = CliRunner().invoke(cli, ["db", "downgrade", "base", "--yes"])
    assert result.exit_code == 0, result.output
    assert _tables(url) == set()


def _upgrade_with_data_from_0001(url: str) -> None:
    """0001 → head keeps every job and its events, links each job to its dataset where that
    still exists, and drops links to models deleted after their jobs finished."""
    upgrade_database(url, "0001")
    now = datetime.now(UTC)
    rows = {
        "tenants": [{"id": "ten_1", "name": "t", "created_at": now}],
        "datasets": [DATASET_ROW],
        "models": [MODEL_ROW],
        "jobs": [
            {**JOB_ROW, "id": "job_live", "spec": {"dataset_id": "ds_1"}},
            {**JOB_ROW, "id": "job_old", "status": "succeeded", "spec": {"dataset_id": "ds_gone"}},
        ],
        "job_models": [
            {"job_id": "job_live", "model_id": "mdl_1"},
            {"job_id": "job_old", "model_id": "mdl_gone"},
        ],
        "job_events": [
            {"job_id": job, "seq": 1, "type": "status", "data": {}, "at": now}
            for job in ("job_live", "job_old")
        ],
    }
    engine = get_engine(url)
    metadata = MetaData()
    metadata.reflect(engine)
    with engine.begin() as conn:
        for table, values in rows.items():
            conn.execute(metadata.tables[table].insert(), values)

    upgrade_database(url)
    with engine.connect() as conn:
        count = lambda table: conn.execute(text(f"SELECT count(*) FROM {table}")).scalar()  # noqa: E731
        assert count("jobs") == 2 and count("job_events") == 2
        assert conn.execute(text("SELECT job_id, model_id FROM job_models")).all() == [
            ("job_live", "mdl_1")
        ]
        assert conn.execute(text("SELECT job_id, dataset_id FROM job_datasets")).all() == [
            ("job_live", "ds_1")
        ]
    # The database now refuses to orphan a job.
    with pytest.raises(IntegrityError), engine.begin() as conn:
        conn.execute(text("DELETE FROM datasets WHERE id = 'ds_1'"))


DATASET_ROW = {
    "id": "ds_1",
    "tenant_id": "ten_1",
    "name": "d",
    "format": "npz",
    "options": {},
    "n_samples": 1,
    "x_shape": [None, 1],
    "x_dtype": "float32",
    "has_labels": False,
    "info": {},
    "size_bytes": 1,
    "sha256": "0" * 64,
    "storage_key": "k",
    "created_at": datetime.now(UTC),
}
MODEL_ROW = {
    "id": "mdl_1",
    "tenant_id": "ten_1",
    "name": "m",
    "format": "onnx",
    "size_bytes": 1,
    "sha256": "0" * 64,
    "signature": {},
    "trainable": False,
    "storage_key": "k",
    "created_at": datetime.now(UTC),
}
JOB_ROW = {
    "tenant_id": "ten_1",
    "status": "queued",
    "queue": "cpu",
    "progress": {},
    "metrics": {},
    "attempt": 0,
    "cancel_requested": False,
    "created_at": datetime.now(UTC),
}


def test_upgrade_keeps_jobs_and_links_them_on_postgres() -> None:
    require_service("PostgreSQL", "127.0.0.1", 5432)
    with fresh_postgres(POSTGRES_URL) as url:
        _upgrade_with_data_from_0001(url)


def test_upgrade_keeps_jobs_and_links_them_on_sqlite(tmp_path: Path) -> None:
    _upgrade_with_data_from_0001(f"sqlite:///{tmp_path / 'distill.db'}")
