"""Jobs over HTTP: validation against uploads, idempotency, lists, cancel, events (SQLite, PG)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from httpx import Response
from sqlalchemy import func, select

import core.jobs
from api.job_intake import JobIntake
from core.db import get_engine
from core.errors import Conflict, InvalidSpec
from core.job_creation import JobRequest, create_jobs, statements_for
from core.jobs import add_event
from core.models import Dataset, Job, JobDataset, JobModel, Model, Tenant
from tests.conftest import POSTGRES_URL, require_service
from tests.service.api_support import (
    Api,
    build_api,
    insert_dataset,
    insert_job,
    insert_model,
)
from tests.service.helpers import fresh_postgres, migrate


@pytest.fixture(scope="module")
def pg_database() -> Iterator[str]:
    require_service("PostgreSQL", "127.0.0.1", 5432)
    with fresh_postgres(POSTGRES_URL) as url:
        migrate(url)
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def api(request: pytest.FixtureRequest, tmp_path: Path) -> Api:
    if request.param == "postgres":
        url = request.getfixturevalue("pg_database")
    else:
        url = f"sqlite:///{tmp_path / 'distill.db'}"
        migrate(url)
    return build_api(url, tmp_path)


@pytest.fixture
def setup(api: Api) -> dict[str, str]:
    """A tenant with a digits teacher, a trainable student model and a digits dataset."""
    tenant = api.tenant()
    with api.session() as s:
        teacher = insert_model(s, tenant.id)
        onnx = insert_model(s, tenant.id, format="onnx", trainable=False)
        dataset = insert_dataset(s, tenant.id)
    return {
        "teacher": teacher.id,
        "onnx": onnx.id,
        "dataset": dataset.id,
        "key": tenant.key,
        "tenant": tenant.id,
    }


def _h(setup: dict[str, str]) -> dict[str, str]:
    return {"Authorization": f"Bearer {setup['key']}"}


def _spec(setup: dict[str, str], **extra: object) -> dict[str, object]:
    return {"teacher": {"model_id": setup["teacher"]}, "dataset_id": setup["dataset"], **extra}


def _job_count(api: Api, tenant_id: str) -> int:
    with api.session() as s:
        return s.scalar(select(func.count()).select_from(Job).where(Job.tenant_id == tenant_id))


def test_create_job_fills_the_spec_queues_and_enqueues(api: Api, setup: dict[str, str]) -> None:
    r = api.client.post("/v1/jobs", json=_spec(setup, name="digits"), headers=_h(setup))
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["id"].startswith("job_") and job["name"] == "digits"
    assert job["status"] == "queued" and job["attempt"] == 0 and job["queue"] == "cpu"
    spec = job["spec"]
    assert spec["task"] == "classification"  # inferred from the labelled dataset
    assert spec["distillation"]["method"] == "kd"
    # The default student is sized from the teacher, and what the recipe chose reads as
    # {"auto": value}; the learning rate is found when the job runs.
    assert spec["student"]["preset"] == "mlp" and set(spec["student"]["width"]) == {"auto"}
    training = spec["training"]
    assert set(training["batch_size"]) == set(training["epochs"]) == {"auto"}
    assert training["lr"] == "auto"
    assert job["progress"]["epochs"] == training["epochs"]["auto"]
    assert job["created_at"].endswith("Z") and job["started_at"] is None
    assert api.enqueued == [job["id"]]

    with api.session() as s:
        used = s.scalars(select(JobModel.model_id).where(JobModel.job_id == job["id"])).all()
    assert used == [setup["teacher"]]
    events = api.client.get(f"/v1/jobs/{job['id']}/events", headers=_h(setup)).json()
    assert [(e["seq"], e["type"], e["data"]) for e in events["data"]] == [
        (1, "status", {"status": "queued"})
    ]
    got = api.client.get(f"/v1/jobs/{job['id']}", headers=_h(setup)).json()
    assert got == job


def test_cuda_jobs_go_to_the_gpu_queue(api: Api, setup: dict[str, str]) -> None:
    r = api.client.post(
        "/v1/jobs", json=_spec(setup, training={"device": "cuda"}), headers=_h(setup)
    )
    assert r.status_code == 201 and r.json()["queue"] == "gpu"


def test_a_teacher_on_cuda_sends_the_job_to_the_gpu_queue() -> None:
    from core.config import Settings
    from core.job_creation.rows import choose_queue
    from core.spec import parse_spec

    settings = Settings(gpu_workers=False)
    body = {"teacher": {"model_id": "m"}, "dataset_id": "d", "training": {"device": "cpu"}}
    assert choose_queue(parse_spec(body), settings) == "cpu"
    body["training"]["teacher_device"] = "cuda:1"
    assert choose_queue(parse_spec(body), settings) == "gpu"


@pytest.mark.parametrize(
    ("change", "code", "field"),
    [
        ({"colour": "red"}, "invalid_spec", "colour"),
        ({"teacher": {"model_id": "mdl_missing"}}, "invalid_spec", "teacher.model_id"),
        ({"teacher": {"path": "teacher.pt2"}}, "invalid_spec", "teacher.path"),
        ({"dataset_id": "ds_missing"}, "invalid_spec", "dataset_id"),
        ({"dataset_id": None, "dataset_path": "x.npz"}, "invalid_spec", "dataset_path"),
        ({"training": {"epochs": 0}}, "invalid_spec", "training.epochs"),
        ({"student": {"model_id": "ONNX"}}, "invalid_spec", "student.model_id"),
        ({"teacher": None}, "invalid_spec", "teacher"),
    ],
)
def test_invalid_specs_are_refused_naming_the_field(
    api: Api, setup: dict[str, str], change: dict[str, object], code: str, field: str
) -> None:
    spec = _spec(setup)
    spec.update(change)
    spec = {k: v for k, v in spec.items() if v is not None}
    if spec.get("student") == {"model_id": "ONNX"}:
        spec["student"] = {"model_id": setup["onnx"]}  # an ONNX model cannot be trained
    r = api.client.post("/v1/jobs", json=spec, headers=_h(setup))
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == code
    assert error["details"]["field"] == field
    assert error["message"]
    assert _job_count(api, setup["tenant"]) == 0 and api.enqueued == []


def test_a_feature_method_with_a_torchscript_teacher_is_refused_at_submission(
    api: Api, setup: dict[str, str]
) -> None:
    with api.session() as s:
        scripted = insert_model(s, setup["tenant"], format="torchscript")
    spec = _spec(setup, distillation={"method": "fitnet"})
    spec["teacher"] = {"model_id": scripted.id}
    r = api.client.post("/v1/jobs", json=spec, headers=_h(setup))
    assert r.status_code == 422, r.text
    assert r.json()["error"]["details"]["field"] == "distillation.method"
    assert "exported_program" in r.json()["error"]["message"]
    assert _job_count(api, setup["tenant"]) == 0 and api.enqueued == []


def test_shape_mismatch_names_the_teacher(api: Api, setup: dict[str, str]) -> None:
    with api.session() as s:
        rgb = insert_dataset(s, setup["tenant"], x_shape=[None, 3, 32, 32])
    r = api.client.post("/v1/jobs", json=_spec(setup, dataset_id=rgb.id), headers=_h(setup))
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "shape_mismatch"
    assert r.json()["error"]["details"]["field"] == "teacher"
    assert _job_count(api, setup["tenant"]) == 0 and api.enqueued == []


def test_another_tenants_model_is_unknown(api: Api, setup: dict[str, str]) -> None:
    other = api.tenant()
    with api.session() as s:
        theirs = insert_model(s, other.id)
    r = api.client.post(
        "/v1/jobs", json=_spec(setup, teacher={"model_id": theirs.id}), headers=_h(setup)
    )
    assert r.status_code == 422
    assert r.json()["error"]["details"]["field"] == "teacher.model_id"
    ensemble = {
        "teachers": [{"model_id": setup["teacher"]}, {"model_id": theirs.id}],
        "dataset_id": setup["dataset"],
    }
    r = api.client.post("/v1/jobs", json=ensemble, headers=_h(setup))
    assert r.status_code == 422
    assert r.json()["error"]["details"]["field"] == "teachers.1.model_id"


def test_idempotency_key_returns_the_first_job(api: Api, setup: dict[str, str]) -> None:
    headers = {**_h(setup), "Idempotency-Key": "abc-123"}
    first = api.client.post("/v1/jobs", json=_spec(setup), headers=headers)
    again = api.client.post("/v1/jobs", json=_spec(setup), headers=headers)
    assert first.status_code == 201 and again.status_code == 200
    assert again.json() == first.json()
    assert _job_count(api, setup["tenant"]) == 1 and len(api.enqueued) == 1

    different = api.client.post("/v1/jobs", json=_spec(setup, name="other"), headers=headers)
    assert different.status_code == 409
    assert different.json()["error"]["code"] == "conflict"
    # Keys are per tenant: another tenant may use the same key.
    other = api.tenant()
    with api.session() as s:
        t2 = insert_model(s, other.id)
        d2 = insert_dataset(s, other.id)
    r = api.client.post(
        "/v1/jobs",
        json={"teacher": {"model_id": t2.id}, "dataset_id": d2.id},
        headers={**other.headers, "Idempotency-Key": "abc-123"},
    )
    assert r.status_code == 201 and r.json()["id"] != first.json()["id"]


def test_idempotency_key_expires_after_a_day(api: Api, setup: dict[str, str]) -> None:
    from datetime import timedelta

    from core.models import IdempotencyKey, utcnow

    headers = {**_h(setup), "Idempotency-Key": "old"}
    first = api.client.post("/v1/jobs", json=_spec(setup), headers=headers).json()
    with api.session() as s:
        row = s.scalars(select(IdempotencyKey).where(IdempotencyKey.key == "old")).one()
        row.created_at = utcnow() - timedelta(hours=25)
        s.commit()
    second = api.client.post("/v1/jobs", json=_spec(setup), headers=headers)
    assert second.status_code == 201 and second.json()["id"] != first["id"]


def test_list_jobs_newest_first_with_cursor_and_status(api: Api, setup: dict[str, str]) -> None:
    ids = [
        api.client.post("/v1/jobs", json=_spec(setup), headers=_h(setup)).json()["id"]
        for _ in range(5)
    ]
    api.client.post(f"/v1/jobs/{ids[0]}/cancel", headers=_h(setup))
    page1 = api.client.get("/v1/jobs?limit=2", headers=_h(setup)).json()
    assert [j["id"] for j in page1["data"]] == ids[::-1][:2] and page1["has_more"]
    page2 = api.client.get(f"/v1/jobs?limit=2&after={ids[3]}", headers=_h(setup)).json()
    assert [j["id"] for j in page2["data"]] == [ids[2], ids[1]] and page2["has_more"]
    page3 = api.client.get(f"/v1/jobs?limit=2&after={ids[1]}", headers=_h(setup)).json()
    assert [j["id"] for j in page3["data"]] == [ids[0]] and not page3["has_more"]
    cancelled = api.client.get("/v1/jobs?status=cancelled", headers=_h(setup)).json()
    assert [j["id"] for j in cancelled["data"]] == [ids[0]]
    bad = api.client.get("/v1/jobs?status=sleeping", headers=_h(setup))
    assert bad.status_code == 422 and bad.json()["error"]["details"]["field"] == "status"
    too_many = api.client.get("/v1/jobs?limit=101", headers=_h(setup))
    assert too_many.status_code == 422 and too_many.json()["error"]["code"] == "invalid_request"


def test_cancel_a_queued_job_is_immediate_and_idempotent(api: Api, setup: dict[str, str]) -> None:
    job = api.client.post("/v1/jobs", json=_spec(setup), headers=_h(setup)).json()
    first = api.client.post(f"/v1/jobs/{job['id']}/cancel", headers=_h(setup))
    again = api.client.post(f"/v1/jobs/{job['id']}/cancel", headers=_h(setup))
    assert first.status_code == again.status_code == 200
    assert first.json()["status"] == again.json()["status"] == "cancelled"
    assert first.json()["finished_at"] is not None
    events = api.client.get(f"/v1/jobs/{job['id']}/events", headers=_h(setup)).json()["data"]
    statuses = [e["data"]["status"] for e in events if e["type"] == "status"]
    assert statuses == ["queued", "cancelled"]


def test_delete_model_refused_while_a_job_uses_it(api: Api, setup: dict[str, str]) -> None:
    job = api.client.post("/v1/jobs", json=_spec(setup), headers=_h(setup)).json()
    r = api.client.delete(f"/v1/models/{setup['teacher']}", headers=_h(setup))
    assert r.status_code == 409 and job["id"] in r.json()["error"]["message"]
    r = api.client.delete(f"/v1/datasets/{setup['dataset']}", headers=_h(setup))
    assert r.status_code == 409
    api.client.post(f"/v1/jobs/{job['id']}/cancel", headers=_h(setup))
    r = api.client.delete(f"/v1/models/{setup['teacher']}", headers=_h(setup))
    assert r.status_code == 200 and r.json() == {"id": setup["teacher"], "deleted": True}
    assert api.client.get(f"/v1/models/{setup['teacher']}", headers=_h(setup)).status_code == 404
    assert (
        api.client.delete(f"/v1/datasets/{setup['dataset']}", headers=_h(setup)).status_code == 200
    )


@pytest.mark.parametrize("upload", ["dataset", "teacher"])
def test_an_upload_deleted_while_its_job_is_taken_in_fails_that_request_only(
    api: Api, setup: dict[str, str], monkeypatch: pytest.MonkeyPatch, upload: str
) -> None:
    """The intake looks uploads up, then inserts: an upload deleted in between is refused by
    the foreign keys, and the request gets the error that names it, not a job without it."""
    statements = api.app.state.job_intake.statements
    real_insert = statements.insert
    model = Dataset if upload == "dataset" else Model

    def delete_first(conn, inserts):  # noqa: ANN001, ANN202 - the statements' own signature
        monkeypatch.setattr(statements, "insert", real_insert)
        with api.session() as s:  # another connection, as a DELETE request would be
            s.delete(s.get(model, setup[upload]))
            s.commit()
        real_insert(conn, inserts)

    monkeypatch.setattr(statements, "insert", delete_first)
    r = api.client.post("/v1/jobs", json=_spec(setup), headers=_h(setup))
    assert r.status_code == 422, r.text
    field = "dataset_id" if upload == "dataset" else "teacher.model_id"
    assert r.json()["error"]["details"]["field"] == field
    assert setup[upload] in r.json()["error"]["message"]
    assert _job_count(api, setup["tenant"]) == 0
    again = api.client.post("/v1/jobs", json=_spec(setup), headers=_h(setup))
    assert again.status_code == 422  # and the intake goes on


@pytest.mark.parametrize("upload", ["dataset", "teacher"])
def test_a_delete_that_races_a_new_job_is_refused_by_the_database(
    api: Api, setup: dict[str, str], monkeypatch: pytest.MonkeyPatch, upload: str
) -> None:
    """The route's own check can miss a job stored after it; the foreign key cannot."""
    job = api.client.post("/v1/jobs", json=_spec(setup), headers=_h(setup)).json()
    monkeypatch.setattr(core.jobs, "jobs_using", lambda *args: [])
    path = (
        f"/v1/datasets/{setup['dataset']}"
        if upload == "dataset"
        else f"/v1/models/{setup['teacher']}"
    )
    r = api.client.delete(path, headers=_h(setup))
    monkeypatch.undo()
    assert r.status_code == 409, r.text
    assert "submitted just now" in r.json()["error"]["message"]
    assert api.client.get(path, headers=_h(setup)).status_code == 200  # nothing deleted
    api.client.post(f"/v1/jobs/{job['id']}/cancel", headers=_h(setup))
    assert api.client.delete(path, headers=_h(setup)).status_code == 200


def test_a_submit_and_a_delete_racing_for_one_dataset_never_orphan_a_job(
    api: Api, setup: dict[str, str]
) -> None:
    """Real concurrency, both orders: the job is stored and the delete refused, or the delete
    goes through and the job is refused; never both, never a 500."""
    posts, deletes = TestClient(api.app), TestClient(api.app)  # one per thread
    for _ in range(20):
        with api.session() as s:
            dataset = insert_dataset(s, setup["tenant"]).id
        start = threading.Barrier(2)  # both requests leave together
        spec = _spec(setup, dataset_id=dataset)
        with ThreadPoolExecutor(2) as pool:
            submit = pool.submit(
                _after, start, partial(posts.post, "/v1/jobs", json=spec, headers=_h(setup))
            )
            remove = pool.submit(
                _after, start, partial(deletes.delete, f"/v1/datasets/{dataset}", headers=_h(setup))
            )
            submitted, deleted = submit.result(), remove.result()
        outcome = (submitted.status_code, deleted.status_code)
        assert outcome in {(201, 409), (422, 200)}, (submitted.text, deleted.text)
        with api.session() as s:
            kept = s.get(Dataset, dataset) is not None
            linked = s.scalars(select(JobDataset.job_id).where(JobDataset.dataset_id == dataset))
            assert kept == (submitted.status_code == 201) == bool(list(linked))
        if submitted.status_code == 201:
            api.client.post(f"/v1/jobs/{submitted.json()['id']}/cancel", headers=_h(setup))


def _after(barrier: threading.Barrier, send: Callable[[], Response]) -> Response:
    barrier.wait()
    return send()


def test_events_after_and_limit(api: Api, setup: dict[str, str]) -> None:
    with api.session() as s:
        job = insert_job(s, setup["tenant"])
        for epoch in range(1, 6):
            add_event(s, job.id, "metrics", {"epoch": epoch, "train_loss": 1.0 / epoch})
        s.commit()
    url = f"/v1/jobs/{job.id}/events"
    r = api.client.get(f"{url}?after=2&limit=3", headers=_h(setup)).json()
    assert [e["seq"] for e in r["data"]] == [3, 4, 5] and r["has_more"]
    assert r["data"][0]["data"] == {"epoch": 2, "train_loss": 0.5}
    assert r["data"][0]["at"].endswith("Z")
    r = api.client.get(f"{url}?after=5", headers=_h(setup)).json()
    assert [e["seq"] for e in r["data"]] == [6] and not r["has_more"]


def _read_sse(lines: Iterator[str]) -> list[dict[str, object]]:
    events, current = [], {}
    for line in lines:
        if line == "":
            if "data" in current:
                events.append(current)
            current = {}
        elif line.startswith("id: "):
            current["id"] = int(line[4:])
        elif line.startswith("data: "):
            current["data"] = json.loads(line[6:])
    return events


def test_event_stream_is_live_and_ends_with_the_final_status(
    api: Api, setup: dict[str, str]
) -> None:
    api.app.state.sse_poll_seconds = 0.05
    api.app.state.sse_keepalive_seconds = 0.2
    with api.session() as s:
        job = insert_job(s, setup["tenant"])
        add_event(s, job.id, "metrics", {"epoch": 1})
        s.commit()

    def finish_later() -> None:
        time.sleep(0.5)
        with api.session() as s:
            add_event(s, job.id, "status", {"status": "running"})
            add_event(s, job.id, "metrics", {"epoch": 2})
            add_event(s, job.id, "status", {"status": "succeeded"})
            s.commit()

    writer = threading.Thread(target=finish_later)
    writer.start()
    headers = {**_h(setup), "Accept": "text/event-stream", "Last-Event-ID": "1"}
    started = time.monotonic()
    with api.client.stream("GET", f"/v1/jobs/{job.id}/events", headers=headers) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = list(r.iter_lines())
    events = _read_sse(iter(lines))
    writer.join()
    assert ": keep-alive" in lines  # sent while nothing happened
    assert time.monotonic() - started >= 0.4  # it waited for the live events
    assert [e["id"] for e in events] == [2, 3, 4, 5]
    assert events[-1]["data"]["data"] == {"status": "succeeded"}


def test_models_and_datasets_lists_page_newest_first(api: Api) -> None:
    tenant = api.tenant()
    with api.session() as s:
        models = [insert_model(s, tenant.id, name=f"m{i}").id for i in range(3)]
        datasets = [insert_dataset(s, tenant.id).id for _ in range(3)]
    for kind, ids in (("models", models), ("datasets", datasets)):
        first = api.client.get(f"/v1/{kind}?limit=2", headers=tenant.headers).json()
        assert [r["id"] for r in first["data"]] == [ids[2], ids[1]] and first["has_more"]
        rest = api.client.get(f"/v1/{kind}?limit=2&after={ids[1]}", headers=tenant.headers).json()
        assert [r["id"] for r in rest["data"]] == [ids[0]] and not rest["has_more"]
    model = api.client.get(f"/v1/models/{models[0]}", headers=tenant.headers).json()
    assert model["signature"]["outputs"] == [{"shape": [None, 10], "dtype": "float32"}]
    assert model["name"] == "m0" and model["created_at"].endswith("Z")


def test_a_broker_failure_keeps_the_job_queued(api: Api, setup: dict[str, str]) -> None:
    def broker_down(job: object) -> None:
        raise ConnectionError("broker unreachable")

    api.app.state.enqueue = broker_down
    r = api.client.post("/v1/jobs", json=_spec(setup), headers=_h(setup))
    assert r.status_code == 201 and r.json()["status"] == "queued"
    # The row is there for the reconciler to send again.
    assert _job_count(api, setup["tenant"]) == 1


def test_one_intake_batch_answers_each_request_on_its_own(api: Api, setup: dict[str, str]) -> None:
    """A batch that mixes new jobs, bad specs, a key used twice and a reused key with another
    body: each request gets its own answer, and only the new jobs are stored."""
    tenant = Tenant(id=setup["tenant"], name="")
    stranger = Tenant(id=api.tenant().id, name="")
    good = _spec(setup)
    requests = [
        JobRequest(tenant, good),
        JobRequest(tenant, {**good, "dataset_id": "ds_missing"}),
        JobRequest(tenant, good, "key-1"),
        JobRequest(tenant, good, "key-1"),  # the same key in the same batch: a replay
        JobRequest(stranger, good),  # another tenant's teacher and dataset
        JobRequest(tenant, {**good, "name": "other"}, "key-1"),
    ]
    engine = get_engine(api.settings.database)
    statements = statements_for(engine.dialect)
    with statements.prepare(engine.connect()) as conn:
        answers = create_jobs(conn, statements, requests, api.settings)

    (first, replayed), missing, (keyed, _), (again, replayed_again), foreign, reused = answers
    assert not replayed and replayed_again and again.id == keyed.id != first.id
    assert isinstance(missing, InvalidSpec) and missing.details["field"] == "dataset_id"
    assert isinstance(foreign, InvalidSpec) and foreign.details["field"] == "teacher.model_id"
    assert isinstance(reused, Conflict) and reused.details["job_id"] == keyed.id
    assert _job_count(api, setup["tenant"]) == 2 and _job_count(api, stranger.id) == 0
    for job_id in (first.id, keyed.id):
        events = api.client.get(f"/v1/jobs/{job_id}/events", headers=_h(setup)).json()["data"]
        assert [e["data"] for e in events] == [{"status": "queued"}]


def test_concurrent_creates_each_get_their_own_job(api: Api, setup: dict[str, str]) -> None:
    intake = JobIntake(get_engine(api.settings.database), api.settings)
    tenant = Tenant(id=setup["tenant"], name="")
    futures: list[Future] = []

    def submit(n: int) -> None:
        for i in range(n):
            futures.append(intake.submit(JobRequest(tenant, _spec(setup, name=f"job-{i}"))))

    submitters = [threading.Thread(target=submit, args=(25,)) for _ in range(4)]
    for thread in submitters:
        thread.start()
    for thread in submitters:
        thread.join()
    jobs = [future.result(timeout=30)[0] for future in futures]
    intake.close()
    assert len({job.id for job in jobs}) == 100 and _job_count(api, setup["tenant"]) == 100


def test_a_spec_sent_without_the_json_content_type_says_to_send_that_header(
    api: Api, setup: dict[str, str]
) -> None:
    # curl -d '{…}' without -H: the body arrives as application/x-www-form-urlencoded.
    body = json.dumps(_spec(setup))
    sent = {"Content-Type": "application/x-www-form-urlencoded", **_h(setup)}
    r = api.client.post("/v1/jobs", content=body, headers=sent)
    assert r.status_code == 422, r.text
    message = r.json()["error"]["message"]
    assert "Content-Type: application/json" in message and "x-www-form-urlencoded" in message
    assert "valid dictionary" not in message
    assert _job_count(api, setup["tenant"]) == 0
    # The same body with the header is a job.
    ok = api.client.post(
        "/v1/jobs", content=body, headers={**_h(setup), "Content-Type": "application/json"}
    )
    assert ok.status_code == 201, ok.text
