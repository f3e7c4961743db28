"""A real API process on a given database, with two tenants that each own a teacher and a
dataset: what the request-hardening and quota tests send their requests to."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select

from core.auth import create_key
from core.db import session_scope
from core.models import Job
from tests.conftest import POSTGRES_URL, require_service
from tests.service.api_support import insert_dataset, insert_model
from tests.service.helpers import Proc, fresh_postgres, migrate, service_env, start_api


@dataclass
class Caller:
    tenant_id: str
    key: str
    teacher: str
    dataset: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"}

    def body(self, extra: str = "") -> bytes:
        head = f'{{"teacher": {{"model_id": "{self.teacher}"}}, "dataset_id": "{self.dataset}"'
        return (head + (f", {extra}" if extra else "") + "}").encode()


@dataclass
class Service:
    proc: Proc
    base: str
    url: str
    a: Caller
    b: Caller

    def jobs(self, caller: Caller) -> int:
        with session_scope(self.url) as s:
            query = select(func.count()).select_from(Job).where(Job.tenant_id == caller.tenant_id)
            return s.scalar(query)


@contextmanager
def open_database(kind: str, tmp: Path) -> Iterator[str]:
    """A migrated database: a fresh one on the local PostgreSQL, or a SQLite file in ``tmp``."""
    if kind == "postgres":
        require_service("PostgreSQL", "127.0.0.1", 5432)
        with fresh_postgres(POSTGRES_URL) as url:
            migrate(url)
            yield url
    else:
        url = f"sqlite:///{tmp / 'distill.db'}"
        migrate(url)
        yield url


def make_caller(url: str, name: str) -> Caller:
    with session_scope(url) as s:
        row, key = create_key(s, name)
        s.flush()
        teacher = insert_model(s, row.tenant_id).id
        dataset = insert_dataset(s, row.tenant_id).id
        return Caller(row.tenant_id, key, teacher, dataset)


def start_service(
    url: str, tmp: Path, factory: str = "api.main:create_app", **settings: str
) -> Service:
    """A real API process on ``url`` with two tenants, each with a teacher and a dataset."""
    env = service_env(
        database_url=url,
        data_dir=str(tmp / "data"),
        broker_url=f"sqla+sqlite:///{tmp / 'broker.db'}",
        warm_sandbox="false",
        **settings,
    )
    proc, base = start_api(env, tmp, factory=factory)
    return Service(proc, base, url, make_caller(url, "tenant-a"), make_caller(url, "tenant-b"))
