"""Teacher caches shared through storage (worker/teacher_cache.py), on real local storage.

Two "worker machines" are two cache folders sharing one store. The sync is first checked on
hand-made caches (what is stored, what a hostile job's folder cannot smuggle out, what another
tenant sees); then on real jobs: the API, the runner and the engine with a tiny GPT-2 teacher,
where a job on machine B reads the cache that a job on machine A built.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from core.config import Settings
from core.db import session_factory
from core.jobs import claim_job
from core.storage import LocalStorage
from tests.core.causal_files import corpus, train_teacher, zip_folder
from tests.service.api_support import Api, Tenant, build_api
from tests.service.helpers import migrate
from worker import teacher_cache
from worker.runner import run_claimed_job
from worker.teacher_cache import CacheInputs, fetch, publish

pytestmark = pytest.mark.service

TEACHER, DATASET = "a1" * 32, "b2" * 32
NAME = f"{TEACHER[:24]}-{DATASET[:24]}-L64-k8"
SEQKD = f"seqkd-{TEACHER[:24]}-{DATASET[:24]}-L64-{'c' * 12}.jsonl"
INPUTS = CacheInputs([TEACHER], DATASET)
PASSWD = Path("/etc/passwd")


def _cache(folder: Path, name: str = NAME, size: int = 1000, meta: bool = True) -> Path:
    """A finished top-k folder as the engine writes it (bytes standing for the arrays)."""
    folder.mkdir(parents=True)
    for file in teacher_cache.TOPK_FILES:
        (folder / file).write_bytes(os.urandom(size))
    if meta:
        (folder / "meta.json").write_text(json.dumps({"key": name, "rows": 1}))
    return folder


def _stored(storage: LocalStorage) -> dict[str, bytes]:
    return {key: (storage.root / key).read_bytes() for key in storage.keys("")}


def test_a_finished_cache_reaches_another_machine_and_no_other_tenant(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "blobs")
    machine_a, machine_b = tmp_path / "a" / "ten_1", tmp_path / "b" / "ten_1"
    built = _cache(machine_a / NAME)
    (machine_a / SEQKD).write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    other = f"{TEACHER[:24]}-{DATASET[:24]}-L64-k16"
    _cache(machine_a / other, other, meta=False)  # still being built: not stored

    assert publish(storage, "ten_1", machine_a, max_bytes=10**6) == [NAME, SEQKD]
    assert set(_stored(storage)) == {
        *(f"lm-cache/ten_1/{NAME}/{f}" for f in ("values.f16", "indices", "lse.f32", "meta.json")),
        f"lm-cache/ten_1/{SEQKD}",
    }
    assert publish(storage, "ten_1", machine_a, max_bytes=10**6) == []  # stored already

    beats: list[int] = []
    assert fetch(storage, "ten_1", machine_b, INPUTS, lambda: beats.append(1)) == [NAME, SEQKD]
    assert len(beats) >= 5  # the lease can be renewed while each file downloads
    for file in built.iterdir():
        assert (machine_b / NAME / file.name).read_bytes() == file.read_bytes()
    assert (machine_b / SEQKD).read_bytes() == (machine_a / SEQKD).read_bytes()
    assert sorted(p.name for p in machine_b.iterdir()) == sorted([NAME, SEQKD])  # no leftovers
    assert fetch(storage, "ten_1", machine_b, INPUTS) == []  # here already

    elsewhere = tmp_path / "c" / "ten_2"
    assert fetch(storage, "ten_2", elsewhere, INPUTS) == []  # another tenant's keys
    assert fetch(storage, "ten_1", tmp_path / "d", CacheInputs(["f" * 64], DATASET)) == []


def test_links_and_strange_names_the_job_left_never_reach_storage(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "blobs")
    local = tmp_path / "a" / "ten_1"
    names = [f"{TEACHER[:24]}-{DATASET[:24]}-L{n}-k8" for n in range(1, 7)]
    linked_array = _cache(local / names[0], names[0])
    (linked_array / "values.f16").unlink()
    (linked_array / "values.f16").symlink_to(PASSWD)
    linked_meta = _cache(local / names[1], names[1], meta=False)
    (linked_meta / "meta.json").symlink_to(PASSWD)
    outside = _cache(tmp_path / "outside" / names[2], names[2])
    (local / names[2]).symlink_to(outside, target_is_directory=True)  # the folder is a link
    _cache(local / names[3], names[3], size=4000)  # over the limit below
    _cache(local / names[4], "a-name-that-is-not-its-own")
    _cache(local / "not-a-cache", "not-a-cache")
    (local / SEQKD).symlink_to(PASSWD)
    (local / "passwd").write_bytes(PASSWD.read_bytes())
    good = _cache(local / names[5], names[5])

    assert publish(storage, "ten_1", local, max_bytes=10_000) == [names[5]]
    stored = _stored(storage)
    assert {key.split("/")[2] for key in stored} == {names[5]}
    assert stored[f"lm-cache/ten_1/{names[5]}/values.f16"] == (good / "values.f16").read_bytes()
    secret = PASSWD.read_bytes()
    assert not any(secret in blob for blob in stored.values())


def test_a_stored_folder_missing_a_file_is_not_fetched(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "blobs")
    publish(storage, "ten_1", _cache(tmp_path / "a" / NAME).parent, max_bytes=10**6)
    storage.delete(f"lm-cache/ten_1/{NAME}/indices")
    local = tmp_path / "b"
    assert fetch(storage, "ten_1", local, INPUTS) == []
    assert list(local.iterdir()) == []  # no folder, no half-downloaded one


def test_a_store_that_fails_costs_the_cache_not_the_job(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "blobs")
    local = _cache(tmp_path / "a" / NAME).parent
    storage.root.rmdir()
    storage.root.write_text("a file where the store's folder was")
    assert publish(storage, "ten_1", local, max_bytes=10**6) == []
    assert fetch(storage, "ten_1", tmp_path / "b", INPUTS) == []


# --- real jobs on two machines ---------------------------------------------------------------


class Machines:
    """One API and database, one store, two workers with their own teacher-cache folders."""

    def __init__(self, tmp: Path) -> None:
        url = f"sqlite:///{tmp / 'distill.db'}"
        migrate(url)
        blobs = f"file://{tmp / 'blobs'}"
        self.api: Api = build_api(url, tmp / "api", storage_url=blobs)
        self.tenant: Tenant = self.api.tenant()
        self.sessions = session_factory(url)
        self.settings = {
            name: Settings(
                data_dir=tmp / name,
                database_url=url,
                storage_url=blobs,
                lm_cache_dir=tmp / f"cache-{name}",
            )
            for name in ("a", "b")
        }

    def upload(self, route: str, name: str, rows: list[dict[str, Any]]) -> str:
        body = "".join(json.dumps(r) + "\n" for r in rows).encode()
        return self.upload_bytes(route, name, body)

    def upload_bytes(self, route: str, name: str, body: bytes) -> str:
        r = self.api.client.post(route, files={"file": (name, body)}, headers=self.tenant.headers)
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    def run(self, machine: str, spec: dict[str, Any]) -> dict[str, Any]:
        """Submit a job, run it on ``machine``'s worker; the job as GET /v1/jobs/{id} shows it."""
        r = self.api.client.post("/v1/jobs", json=spec, headers=self.tenant.headers)
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        settings = self.settings[machine]
        with self.sessions() as s:
            assert claim_job(s, job_id, machine, settings.lease_seconds) is not None
        run_claimed_job(
            job_id,
            machine,
            settings=settings,
            session_factory=self.sessions,
            storage=self.api.storage,
        )
        job = self.api.client.get(f"/v1/jobs/{job_id}", headers=self.tenant.headers).json()
        events = self.api.client.get(f"/v1/jobs/{job_id}/events", headers=self.tenant.headers)
        job["log"] = [e["data"].get("message", "") for e in events.json()["data"]]
        return job


@pytest.fixture(scope="module")
def machines(tmp_path_factory: pytest.TempPathFactory) -> Machines:
    return Machines(tmp_path_factory.mktemp("machines"))


@pytest.fixture(scope="module")
def teacher(machines: Machines, tmp_path_factory: pytest.TempPathFactory) -> str:
    """An untrained 2-layer GPT-2 of width 32 with its own tokenizer: what it says is beside
    the point, only whether it runs."""
    tmp = tmp_path_factory.mktemp("teacher")
    train_teacher(tmp / "teacher", corpus()[:100], steps=1, layers=2, width=32)
    path = zip_folder(tmp / "teacher", tmp / "teacher.zip")
    return machines.upload_bytes("/v1/models", "teacher.zip", path.read_bytes())


def _spec(teacher: str, dataset: str) -> dict[str, Any]:
    return {
        "teacher": {"model_id": teacher},
        "dataset_id": dataset,
        "student": {"from_teacher": {"layers": 1, "hidden_size": 16, "heads": 2}},
        "distillation": {"method": "kd"},
        "training": {"epochs": 1, "batch_size": 16, "max_length": 32, "baseline": False},
        "export": [],
    }


@pytest.mark.slow
def test_a_job_on_another_machine_reads_the_cache_through_storage(
    machines: Machines, teacher: str
) -> None:
    texts = corpus()[:40]
    rows = [{"text": t} for t in texts[:32]] + [{"text": t, "split": "val"} for t in texts[32:]]
    dataset = machines.upload("/v1/datasets", "texts.jsonl", rows)

    first = machines.run("a", _spec(teacher, dataset))
    assert first["status"] == "succeeded", first["error"]
    built = first["result"]["logit_cache"]
    assert built["hit"] is False
    assert any("computing the teacher's top-" in m for m in first["log"])
    stored = machines.api.storage.keys(f"lm-cache/{machines.tenant.id}/{built['key']}/")
    names = [k.rsplit("/", 1)[1] for k in stored]
    assert names == ["indices", "lse.f32", "meta.json", "values.f16"]

    second = machines.run("b", _spec(teacher, dataset))
    assert second["status"] == "succeeded", second["error"]
    read = second["result"]["logit_cache"]
    assert read["hit"] is True and read["key"] == built["key"]
    assert read["build_seconds"] == built["build_seconds"]  # machine A's build, not a new one
    assert any(f"brought {built['key']} from storage" in m for m in second["log"])
    assert any("the teacher is not run" in m for m in second["log"])
    assert not any("computing the teacher's top-" in m for m in second["log"])
    local_b = machines.settings["b"].teacher_cache_root / machines.tenant.id
    assert (local_b / built["key"] / "meta.json").is_file()


def test_a_prompt_longer_than_max_length_fails_the_job_naming_its_line(
    machines: Machines, teacher: str
) -> None:
    texts = corpus()[:20]
    rows: list[dict[str, Any]] = (
        [
            {"prompt": "A short prompt", "completion": " and its end"},
            {"prompt": " ".join(texts[:4])},  # far over 32 tokens, with or without a completion
        ]
        + [{"prompt": t[:20], "completion": t[20:60]} for t in texts[4:]]
    )
    dataset = machines.upload("/v1/datasets", "prompts.jsonl", rows)

    job = machines.run("a", _spec(teacher, dataset))
    assert job["status"] == "failed"
    error = job["error"]
    assert error["code"] == "invalid_spec"
    assert error["details"]["field"] == "training.max_length"
    assert error["details"]["line"] == 2 and error["details"]["max_length"] == 32
    assert error["details"]["prompt_tokens"] > 32
    assert "line 2" in error["message"] and "shorten the prompt" in error["message"]
    assert job["progress"]["fraction"] == 0 and job["progress"].get("step") is None  # no step
