"""CPU per job of job creation in-process: ``core.job_creation.create_jobs`` on a fresh database.

No HTTP, no event loop, no broker: the lookups, checks, inserts and commit that a batch of
``POST /v1/jobs`` costs the API's intake thread, for batches of 1, 4 and 16 jobs. CPU time
(``time.process_time``) rather than wall time, so that a busy machine's waits do not count;
each figure is the median of seven rounds.

    .venv/bin/python bench/job_creation_cpu.py --mode embedded
    .venv/bin/python bench/job_creation_cpu.py --mode postgres   # PostgreSQL on 127.0.0.1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy.orm import Session  # noqa: E402

from core.config import Settings  # noqa: E402
from core.db import get_engine  # noqa: E402
from core.job_creation import JobRequest, create_jobs, statements_for  # noqa: E402
from core.models import Tenant  # noqa: E402
from tests.service.api_support import insert_dataset, insert_model  # noqa: E402
from tests.service.helpers import fresh_postgres, migrate  # noqa: E402

POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
BATCH_SIZES = (1, 4, 16)
JOBS_PER_ROUND = 160
ROUNDS = 7


@contextmanager
def _database(mode: str, workdir: Path) -> Iterator[str]:
    if mode == "postgres":
        with fresh_postgres(POSTGRES) as url:
            yield url
    else:
        yield f"sqlite:///{workdir / 'distill.db'}"


def _cpu_per_job(create: Callable[[int], None], size: int) -> float:
    """Median CPU microseconds per job over ``ROUNDS`` rounds of batches of ``size``."""
    for _ in range(20):  # warm up: statements rendered, caches filled
        create(size)
    batches = max(1, JOBS_PER_ROUND // size)
    samples = []
    for _ in range(ROUNDS):
        started = time.process_time()
        for _ in range(batches):
            create(size)
        samples.append((time.process_time() - started) / (batches * size) * 1e6)
    return round(statistics.median(samples))


def measure(mode: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp, _database(mode, Path(tmp)) as url:
        migrate(url)
        settings = Settings(
            data_dir=Path(tmp) / "data", database_url=url, max_active_jobs_per_tenant=10**9
        )
        engine = get_engine(settings.database)
        tenant = Tenant(id="tnt_bench", name="bench")
        with Session(engine) as session:
            session.add(Tenant(id=tenant.id, name=tenant.name))
            session.commit()
            body = {
                "teacher": {"model_id": insert_model(session, tenant.id).id},
                "dataset_id": insert_dataset(session, tenant.id).id,
            }
        statements = statements_for(engine.dialect)
        with statements.prepare(engine.connect()) as conn:

            def create(size: int) -> None:
                requests = [JobRequest(tenant, body) for _ in range(size)]
                for answer in create_jobs(conn, statements, requests, settings):
                    if isinstance(answer, Exception):
                        raise answer

            cpu = {size: _cpu_per_job(create, size) for size in BATCH_SIZES}
        engine.dispose()
    return {"mode": mode, "cpu_us_per_job": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["embedded", "postgres"], default="embedded")
    print(json.dumps(measure(parser.parse_args().mode), indent=2))


if __name__ == "__main__":
    main()
