"""Taking in new jobs: each spec checked against the tenant's uploads, then the jobs stored.

``POST /v1/jobs`` is the API's busiest write. A request hands its body to :class:`JobIntake`,
one thread per API process that stores all the jobs waiting for it at once (:func:`take_in`):
under load, a commit and each statement's round trip are shared by many jobs instead of each
job paying for its own. The statements go straight to the database driver
(``api/pg_intake.py`` on PostgreSQL, ``api/dbapi_intake.py`` elsewhere), and no ORM session or
mapped instance is built: on this path SQLAlchemy's Python cost more CPU than the database.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from concurrent.futures import Future
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any, cast

from psycopg import DataError as PgDataError
from psycopg import IntegrityError as PgIntegrityError
from sqlalchemy import Connection, Engine, Row, delete, func, select
from sqlalchemy.exc import DataError, IntegrityError

from api import dbapi_intake, pg_intake
from api.schemas import JobPublic
from core.batching import BatchingThread
from core.budget import check_budget
from core.config import Settings
from core.errors import ClientError, Conflict, InvalidSpec, QuotaExceeded
from core.models import (
    ACTIVE_STATUSES,
    Dataset,
    IdempotencyKey,
    Job,
    JobDataset,
    JobEvent,
    JobModel,
    Model,
    Tenant,
    as_utc,
    new_id,
    utcnow,
)
from core.spec import DatasetInfo, JobSpec, ModelInfo, ModelRef, complete_spec, parse_spec

IDEMPOTENCY_TTL = timedelta(hours=24)
# When a tenant at its quota of queued and running jobs is told to try again.
RETRY_AFTER_SECONDS = 30
# A key taken twice: raised by SQLAlchemy, or by the driver itself where the intake sends its
# statements around SQLAlchemy (api/pg_intake.py, api/dbapi_intake.py).
INTEGRITY_ERRORS = (IntegrityError, PgIntegrityError, sqlite3.IntegrityError)
# A value the database refuses to store (PostgreSQL's class 22, "data exception"): the fault of
# one request's spec, never of the others committed with it.
DATA_ERRORS = (DataError, PgDataError, sqlite3.DataError)

JOBS, MODELS, DATASETS = Job.__table__, Model.__table__, Dataset.__table__
KEYS, EVENTS = IdempotencyKey.__table__, JobEvent.__table__
JOB_MODELS, JOB_DATASETS = JobModel.__table__, JobDataset.__table__

# The columns of a job that its public form shows (``job_public`` reads them by name).
PUBLIC_COLUMNS = [JOBS.c[name] for name in JobPublic.model_fields if name in JOBS.c]
# What validating a spec reads of the uploads it names.
MODEL_COLUMNS = ("id", "tenant_id", "format", "signature", "trainable", "arch", "parameters")
DATASET_COLUMNS = ("id", "tenant_id", "info")


@dataclass
class JobRequest:
    """One ``POST /v1/jobs``: who asks, the spec as sent, and its Idempotency-Key."""

    tenant: Tenant
    body: Any
    idempotency_key: str | None = None
    # The body's hash, which a key's later uses are checked against (none without a key).
    digest: str | None = field(init=False)

    def __post_init__(self) -> None:
        self.digest = None if self.idempotency_key is None else request_hash(self.body)


# A stored job, as its columns (a new job's by name, an earlier one's as the row its key names),
# and whether it is a replay.
Taken = tuple[SimpleNamespace | Row[Any], bool]
# What a request gets: that, or the error that says why not.
Outcome = Taken | Exception


class JobIntake(BatchingThread[tuple[JobRequest, "Future[Taken]"]]):
    """Takes in jobs on a thread of its own, all that wait in one transaction (group commit)."""

    name = "job-intake"
    # A connection idle this long is checked out of the pool again (which pings it) before use;
    # under load the thread keeps one, saving a checkout and a round trip per batch.
    recheck_after_seconds = 1.0

    def __init__(self, engine: Engine, settings: Settings) -> None:
        super().__init__()
        self._engine = engine
        self._settings = settings
        self._conn: Connection | None = None
        self._last_used = 0.0

    def submit(self, request: JobRequest) -> Future[Taken]:
        """The job this request makes (or replays), or the error that says why not."""
        future: Future[Taken] = Future()
        self.put((request, future))
        return future

    def handle(self, batch: list[tuple[JobRequest, Future[Taken]]]) -> None:
        try:
            conn = self._connection()
            outcomes = take_in(conn, [request for request, _ in batch], self._settings)
        except Exception as exc:  # noqa: BLE001 - e.g. the database is down: each request says so
            self.release()
            outcomes = [exc] * len(batch)
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, Exception):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

    def _connection(self) -> Connection:
        now = time.monotonic()
        if self._conn is not None and now - self._last_used > self.recheck_after_seconds:
            self.release()
        if self._conn is None:
            conn = self._engine.connect()
            if pg_intake.driver_connection(conn) is not None:
                # Each of the batch's two statements is atomic on its own (api/pg_intake.py).
                conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            self._conn = conn
        self._last_used = now
        return self._conn

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with suppress(Exception):  # a broken connection is discarded all the same
                conn.close()


def take_in(
    conn: Connection, requests: list[JobRequest], settings: Settings, *, retry: bool = True
) -> list[Outcome]:
    """Validate and store the jobs of these requests; an outcome for each, in order.

    A request whose Idempotency-Key was used before gets that earlier job (or ``Conflict`` if
    its body differs); one whose spec is wrong gets ``InvalidSpec`` naming the field. The
    others' jobs are committed together.
    """
    try:
        return _take_in(conn, requests, settings)
    except DATA_ERRORS as exc:
        _rollback(conn)
        if len(requests) > 1:
            # One request's value fails the batch's statement: each on its own, so that only
            # that request fails.
            return [_alone(conn, request, settings) for request in requests]
        return [
            InvalidSpec(
                "the database refused a value of this spec; check its text and numbers "
                f"({_first_line(exc)})",
                field="",
            )
        ]
    except INTEGRITY_ERRORS as exc:
        _rollback(conn)
        if len(requests) > 1:
            # A key was used twice (by two requests of this batch, or raced by another process),
            # or an upload was deleted since the lookup. Each on its own, then: the first to
            # commit owns the key, the others replay it; a deleted upload fails its own request.
            return [_alone(conn, request, settings) for request in requests]
        earlier = _replays(conn, requests)[0]
        _rollback(conn)
        if earlier is not None:
            return [(earlier, True) if isinstance(earlier, Row) else earlier]
        if not retry:
            return [exc]
        # Not a key: a model or the dataset was deleted between the lookup and the insert
        # (the foreign keys refused the job). Looked up again, it is missing, and the
        # request gets the error that names it.
        return take_in(conn, requests, settings, retry=False)


def _first_line(exc: BaseException) -> str:
    """The database's own words, without SQLAlchemy's statement and parameters."""
    orig = getattr(exc, "orig", None) or exc
    return str(orig).strip().splitlines()[0][:200] if str(orig).strip() else type(orig).__name__


def _alone(conn: Connection, request: JobRequest, settings: Settings) -> Outcome:
    """One request taken in by itself; an error is its own (others may have committed)."""
    try:
        return take_in(conn, [request], settings)[0]
    except Exception as exc:  # noqa: BLE001 - e.g. the database went away mid-batch
        with suppress(Exception):
            _rollback(conn)
        return exc


def _take_in(conn: Connection, requests: list[JobRequest], settings: Settings) -> list[Outcome]:
    outcomes: list[Outcome | None] = [None] * len(requests)
    specs: dict[int, JobSpec] = {}
    for i, replay in enumerate(_replays(conn, requests)):
        if isinstance(replay, Row):
            outcomes[i] = (replay, True)
        elif replay is not None:
            outcomes[i] = replay
        else:
            try:
                specs[i] = parse_spec(requests[i].body)
            except ClientError as exc:
                outcomes[i] = exc
    uploads = Uploads(conn, list(specs.values()))
    active = _active_jobs(conn, {requests[i].tenant.id for i in specs})
    limit = settings.max_active_jobs_per_tenant
    new_jobs: list[tuple[dict[str, Any], list[str]]] = []
    for i, spec in specs.items():
        request = requests[i]
        try:
            completed, model_ids = resolve_spec(uploads, request.tenant, spec, settings)
            if (running := active.get(request.tenant.id, 0)) >= limit:
                raise QuotaExceeded(
                    f"this tenant has {running} queued or running jobs and may have at most "
                    f"{limit}; submit again when one has finished (or cancel one)",
                    retry_after=RETRY_AFTER_SECONDS,
                    details={"limit": limit, "active": running},
                )
        except ClientError as exc:
            outcomes[i] = exc
            continue
        active[request.tenant.id] = active.get(request.tenant.id, 0) + 1
        columns = _new_job(request, completed, settings)
        new_jobs.append((columns, model_ids))
        outcomes[i] = (SimpleNamespace(**columns), False)
    if new_jobs:
        _insert_jobs(conn, new_jobs)
    _commit(conn)  # also an expired key's deletion
    return cast(list[Outcome], outcomes)  # every request has its outcome by now


def _active_jobs(conn: Connection, tenant_ids: set[str]) -> dict[str, int]:
    """Each tenant's queued and running jobs (one query per batch).

    Two API processes may each admit a job at the limit at once: the quota can be passed by
    a batch or two, never by a flood.
    """
    if not tenant_ids:
        return {}
    query = (
        select(JOBS.c.tenant_id, func.count())
        .where(JOBS.c.tenant_id.in_(tenant_ids), JOBS.c.status.in_(ACTIVE_STATUSES))
        .group_by(JOBS.c.tenant_id)
    )
    return {tenant_id: count for tenant_id, count in conn.execute(query)}


def _commit(conn: Connection) -> None:
    """Commit through SQLAlchemy and at the driver: statements sent around SQLAlchemy
    (``api/dbapi_intake.py``) may have begun a transaction that it does not know of."""
    conn.commit()
    conn.connection.driver_connection.commit()


def _rollback(conn: Connection) -> None:
    conn.rollback()
    conn.connection.driver_connection.rollback()


def request_hash(body: Any) -> str:
    return hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


def choose_queue(spec: JobSpec, settings: Settings) -> str:
    """``gpu`` when the job asks for CUDA, or says ``auto`` and GPU workers exist; else ``cpu``."""
    device = spec.training.device
    if device.startswith("cuda") or (device == "auto" and settings.gpu_workers):
        return "gpu"
    return "cpu"


# --- validation against what the tenant has uploaded ------------------------------------------


class Uploads:
    """The models and datasets that some specs name: one round trip on PostgreSQL, two queries
    elsewhere."""

    def __init__(self, conn: Connection, specs: list[JobSpec]) -> None:
        model_ids = {r.ref.model_id for spec in specs for r in spec.model_refs() if r.ref.model_id}
        dataset_ids = {spec.dataset_id for spec in specs if spec.dataset_id}
        self._models: dict[str, Any] = {}
        self._datasets: dict[str, Any] = {}
        if not (model_ids or dataset_ids):
            return
        if (driver := pg_intake.driver_connection(conn)) is not None:
            self._models, self._datasets = pg_intake.lookup_uploads(driver, model_ids, dataset_ids)
        else:
            self._models = dbapi_intake.rows_by_id(conn, MODELS, MODEL_COLUMNS, list(model_ids))
            self._datasets = dbapi_intake.rows_by_id(
                conn, DATASETS, DATASET_COLUMNS, list(dataset_ids)
            )

    def model(self, tenant: Tenant, model_id: str) -> Any:
        row = self._models.get(model_id)
        return row if row is not None and row.tenant_id == tenant.id else None

    def dataset_info(self, tenant: Tenant, dataset_id: str) -> dict[str, Any] | None:
        row = self._datasets.get(dataset_id)
        return row.info if row is not None and row.tenant_id == tenant.id else None


def resolve_spec(
    uploads: Uploads, tenant: Tenant, spec: JobSpec, settings: Settings
) -> tuple[JobSpec, list[str]]:
    """Check every id against the tenant's uploads, complete the spec and check its budget.

    Returns the completed spec and the ids of the models the job uses.
    """
    teachers = [_model_for(uploads, tenant, ref, name) for name, ref in spec.teacher_fields()]
    used = [m.id for m in teachers]
    for field_name, student in spec.student_fields():
        if student.path is not None:
            raise InvalidSpec(
                f"'{field_name}.path' is for `distill run`; upload the student with POST "
                "/v1/models and give its model_id",
                field=f"{field_name}.path",
            )
        if student.model_id is None:
            continue
        model = _model_for(uploads, tenant, ModelRef(model_id=student.model_id), field_name)
        _check_hf_student(teachers, model, field_name)
        if not model.trainable:
            raise InvalidSpec(
                f"model '{model.id}' ({model.format}) cannot be trained; a student must be an "
                "exported_program, torchscript or safetensors upload, or a preset",
                field=f"{field_name}.model_id",
            )
        used.append(model.id)

    if spec.dataset_path is not None:
        raise InvalidSpec(
            "'dataset_path' is for `distill run`; upload the dataset with POST /v1/datasets and "
            "give its dataset_id",
            field="dataset_path",
        )
    info = uploads.dataset_info(tenant, spec.dataset_id) if spec.dataset_id else None
    if info is None:
        raise InvalidSpec(
            f"no dataset '{spec.dataset_id}'; upload it with POST /v1/datasets (GET "
            "/v1/datasets lists yours)",
            field="dataset_id",
        )
    dataset = DatasetInfo.model_validate(info)
    infos = [model_info(m) for m in teachers]
    completed = complete_spec(spec, infos, dataset)
    check_budget(completed, infos, dataset, settings)
    return completed, list(dict.fromkeys(used))


def _check_hf_student(teachers: list[Row[Any]], student: Row[Any], field_name: str) -> None:
    """An hf teacher's uploaded student is an hf model with the teacher's vocabulary."""
    teacher_hf = teachers[0].signature.get("hf") if teachers else None
    if teacher_hf is None:
        return
    student_hf = student.signature.get("hf")
    if student_hf is None:
        raise InvalidSpec(
            f"model '{student.id}' is a {student.format} file; a Hugging Face teacher's "
            "student is an hf upload (a save_pretrained zip) with the teacher's tokenizer",
            field=f"{field_name}.model_id",
        )
    if student_hf.get("vocab_sha256") != teacher_hf.get("vocab_sha256"):
        raise InvalidSpec(
            f"model '{student.id}' has another vocabulary than the teacher (vocab_size "
            f"{student_hf.get('vocab_size')} vs {teacher_hf.get('vocab_size')}), so their token "
            "ids do not match; save the student with the teacher's tokenizer",
            field=field_name,
        )


def _model_for(uploads: Uploads, tenant: Tenant, ref: ModelRef, field_name: str) -> Row[Any]:
    if ref.path is not None:
        raise InvalidSpec(
            f"'{field_name}.path' is for `distill run` on local files; upload the model with "
            "POST /v1/models and give its model_id",
            field=f"{field_name}.path",
        )
    if ref.format is not None or ref.arch is not None:
        which = "format" if ref.format is not None else "arch"
        raise InvalidSpec(
            f"'{field_name}.{which}' is for local files; the service uses what it recorded when "
            "the model was uploaded, so remove it",
            field=f"{field_name}.{which}",
        )
    model = uploads.model(tenant, ref.model_id) if ref.model_id else None
    if model is None:
        raise InvalidSpec(
            f"no model '{ref.model_id}'; upload it with POST /v1/models (GET /v1/models lists "
            "yours)",
            field=f"{field_name}.model_id",
        )
    return model


def model_info(model: Model | Row[Any]) -> ModelInfo:
    """The ModelInfo recorded for an uploaded model."""
    return ModelInfo(
        format=model.format,
        inputs=model.signature["inputs"],
        outputs=model.signature["outputs"],
        has_default_features=model.signature.get("has_default_features"),
        trainable=model.trainable,
        arch=model.arch,
        parameters=model.parameters,
        hf=model.signature.get("hf"),
    )


# --- storing -----------------------------------------------------------------------------------


def _new_job(request: JobRequest, spec: JobSpec, settings: Settings) -> dict[str, Any]:
    now = utcnow()
    return dict(
        id=new_id("job"),
        tenant_id=request.tenant.id,
        parent_id=None,
        name=spec.name,
        status="queued",
        queue=choose_queue(spec, settings),
        spec=spec.model_dump(mode="json"),
        progress={},
        metrics={},
        result=None,
        error=None,
        attempt=0,
        cancel_requested=False,
        idempotency_key=request.idempotency_key,
        request_hash=request.digest,
        created_at=now,
        enqueued_at=now,  # recorded with the job; the send follows the commit
        started_at=None,
        finished_at=None,
    )


def _insert_jobs(conn: Connection, jobs: list[tuple[dict[str, Any], list[str]]]) -> None:
    """The jobs' rows, their links to their models and dataset, their first events and keys.

    On PostgreSQL all of them are one statement, committed by itself (``api/pg_intake.py``);
    elsewhere each table's rows are one executemany, jobs first (``api/dbapi_intake.py``),
    committed by the caller.
    """
    links = [{"job_id": c["id"], "model_id": m} for c, model_ids in jobs for m in model_ids]
    dataset_links = [{"job_id": c["id"], "dataset_id": c["spec"]["dataset_id"]} for c, _ in jobs]
    events = [
        {
            "job_id": c["id"],
            "seq": 1,
            "type": "status",
            "data": {"status": "queued"},
            "at": c["created_at"],
        }
        for c, _ in jobs
    ]
    keys = [
        {
            "tenant_id": c["tenant_id"],
            "key": c["idempotency_key"],
            "request_hash": c["request_hash"],
            "job_id": c["id"],
            "created_at": c["created_at"],
        }
        for c, _ in jobs
        if c["idempotency_key"] is not None
    ]
    inserts = [
        (JOBS, [c for c, _ in jobs]),
        (JOB_MODELS, links),
        (JOB_DATASETS, dataset_links),
        (EVENTS, events),
        (KEYS, keys),
    ]
    if (driver := pg_intake.driver_connection(conn)) is not None:
        pg_intake.insert_and_commit(driver, inserts)
    else:
        dbapi_intake.insert_rows(conn, inserts)


def _replays(conn: Connection, requests: list[JobRequest]) -> list[Row[Any] | Conflict | None]:
    """For each request, the job its Idempotency-Key made before (a ``Conflict`` if the body
    differs), or None. Expired keys are deleted in the caller's transaction: new jobs take them.
    """
    keys = {r.idempotency_key for r in requests if r.idempotency_key is not None}
    if not keys:
        return [None] * len(requests)
    remembered = {
        (row.tenant_id, row.key): row
        for row in conn.execute(
            select(
                KEYS.c.tenant_id, KEYS.c.key, KEYS.c.created_at, KEYS.c.request_hash, KEYS.c.job_id
            ).where(KEYS.c.key.in_(keys))
        )
    }
    oldest = datetime.now(UTC) - IDEMPOTENCY_TTL
    for (tenant_id, key), row in list(remembered.items()):
        if as_utc(row.created_at) < oldest:
            conn.execute(delete(KEYS).where(KEYS.c.tenant_id == tenant_id, KEYS.c.key == key))
            del remembered[(tenant_id, key)]
    job_ids = {row.job_id for row in remembered.values()}
    jobs = (
        {row.id: row for row in conn.execute(select(*PUBLIC_COLUMNS).where(JOBS.c.id.in_(job_ids)))}
        if job_ids
        else {}
    )
    replays: list[Row[Any] | Conflict | None] = []
    for request in requests:
        row = remembered.get((request.tenant.id, request.idempotency_key))
        if row is None:
            replays.append(None)
        elif row.request_hash != request.digest:
            replays.append(
                Conflict(
                    f"Idempotency-Key '{request.idempotency_key}' was already used with a "
                    "different request body; use a new key for a new job",
                    details={"job_id": row.job_id},
                )
            )
        else:
            replays.append(jobs[row.job_id])
    return replays
