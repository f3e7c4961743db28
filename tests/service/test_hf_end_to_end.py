"""A Hugging Face classifier distilled through real HTTP on the embedded stack.

A user zips a ``save_pretrained`` folder (a tiny BERT with a WordPiece tokenizer trained in the
test), uploads it and a .jsonl of texts labelled by the teacher's label names, submits a job
naming only the teacher and the dataset, downloads ``student_hf`` and ``student_onnx`` and gets
the reported accuracy from both. Each refusal is a 4xx naming what to fix, and runs nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.core.hf_files import (
    paragraphs,
    tiny_bert,
    train_classifier,
    train_tokenizer,
    write_jsonl,
    zip_folder,
)
from tests.service.helpers import migrate, service_env, start_api, start_worker

pytestmark = [pytest.mark.service, pytest.mark.slow]


@pytest.fixture(scope="module")
def http(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """The API and one worker on the embedded defaults (SQLite, no auth)."""
    tmp = tmp_path_factory.mktemp("embedded")
    settings = {
        "data_dir": str(tmp / "data"),
        "storage_url": f"file://{tmp / 'blobs'}",
        "database_url": f"sqlite:///{tmp / 'distill.db'}",
        "auth": "off",
    }
    migrate(settings["database_url"])
    env = service_env(**settings)
    env["HF_HUB_OFFLINE"] = "1"
    api, base = start_api(env, tmp)
    try:
        worker = start_worker(env, tmp)
    except BaseException:
        api.stop()
        raise
    try:
        with httpx.Client(base_url=base, timeout=120) as client:
            yield client
    finally:
        worker.stop()
        api.stop()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("files")
    tokenizer = train_tokenizer()
    teacher = tiny_bert(tmp / "teacher", tokenizer=tokenizer)
    assert train_classifier(teacher) > 0.8
    other = tiny_bert(tmp / "other", tokenizer=train_tokenizer(vocab_size=600))
    rows = [{"text": text, "label": label} for text, label in paragraphs()]
    bad = [*rows[:20], {"text": "a while loop", "label": "loops"}]
    return {
        "teacher": zip_folder(teacher, tmp / "teacher.zip", top="teacher"),
        "other": zip_folder(other, tmp / "other.zip"),
        "texts": write_jsonl(tmp / "topics.jsonl", rows),
        "bad_labels": write_jsonl(tmp / "bad.jsonl", bad),
        "folder": teacher,
    }


def _upload(http: httpx.Client, route: str, path: Path, name: str | None = None) -> httpx.Response:
    with path.open("rb") as fh:
        return http.post(route, files={"file": (name or path.name, fh)})


def _zip_with(folder: Path, path: Path, extra: dict[str, bytes], **config: Any) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for file in sorted(folder.iterdir()):
            data = file.read_bytes()
            if file.name == "config.json":
                data = json.dumps({**json.loads(data), **config}).encode()
            zf.writestr(file.name, data)
        for name, data in extra.items():
            zf.writestr(name, data)
    return path


def test_refusals_name_what_to_do(
    http: httpx.Client, files: dict[str, Path], tmp_path: Path
) -> None:
    folder = files["folder"]
    cases = [
        (_zip_with(folder, tmp_path / "bin.zip", {"pytorch_model.bin": b"\x80\x04."}),
         "unsafe_model_file", "safe_serialization=True"),
        (_zip_with(folder, tmp_path / "am.zip", {}, auto_map={"AutoModel": "m.Model"}),
         "model_invalid", "remove 'auto_map'"),
        (_zip_with(folder, tmp_path / "arch.zip", {}, architectures=["MadeUpForThings"]),
         "model_invalid", "'MadeUpForThings' does not exist"),
    ]  # fmt: skip
    for path, code, words in cases:
        r = _upload(http, "/v1/models", path)
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == code and words in r.json()["error"]["message"]
    assert http.get("/v1/models").json()["data"] == []

    teacher = _upload(http, "/v1/models", files["teacher"]).json()
    other = _upload(http, "/v1/models", files["other"]).json()
    bad = _upload(http, "/v1/datasets", files["bad_labels"]).json()
    texts = _upload(http, "/v1/datasets", files["texts"]).json()
    refused = [
        ({"teacher": {"model_id": teacher["id"]}, "dataset_id": bad["id"]}, "dataset_id"),
        (
            {
                "teacher": {"model_id": teacher["id"]},
                "dataset_id": texts["id"],
                "student": {"model_id": other["id"]},
            },
            "student",
        ),
        (
            {
                "teacher": {"model_id": teacher["id"]},
                "dataset_id": texts["id"],
                "student": {"preset": "transformer"},
            },
            "student.preset",
        ),
    ]
    for spec, field in refused:
        r = http.post("/v1/jobs", json=spec)
        assert r.status_code == 422, r.text
        assert r.json()["error"]["details"]["field"] == field, r.text
    assert "loops" in http.post("/v1/jobs", json=refused[0][0]).json()["error"]["message"]
    assert http.get("/v1/jobs").json()["data"] == []  # nothing runs


def test_distil_download_and_reproduce(http: httpx.Client, files: dict[str, Path]) -> None:
    teacher = _upload(http, "/v1/models", files["teacher"])
    assert teacher.status_code == 201, teacher.text
    model = teacher.json()
    assert model["format"] == "hf" and model["trainable"]
    hf = model["signature"]["hf"]
    assert hf["architecture"] == "BertForSequenceClassification"
    assert hf["task"] == "sequence_classification" and hf["num_labels"] == 3
    assert hf["id2label"]["2"] == "data" and hf["num_layers"] == 2
    dataset = _upload(http, "/v1/datasets", files["texts"]).json()

    r = http.post(
        "/v1/jobs", json={"teacher": {"model_id": model["id"]}, "dataset_id": dataset["id"]}
    )
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["spec"]["student"]["from_teacher"]["layers"] == 1
    assert job["spec"]["export"] == ["hf", "onnx"] and job["spec"]["task"] == "classification"
    deadline = time.monotonic() + 600
    while job["status"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, job
        time.sleep(0.5)
        job = http.get(f"/v1/jobs/{job['id']}").json()
    assert job["status"] == "succeeded", job["error"]
    result = job["result"]
    reported = result["student"]["accuracy"]
    assert result["student"]["parameters"] < result["teacher"]["parameters"] / 2
    assert "baseline" in result and "f1_macro" in result["student"]

    downloaded = _download_all(http, job["id"])
    assert {"student_hf.zip", "student.onnx", "validation.npz", "report.json"} <= set(downloaded)
    val = np.load(io.BytesIO(downloaded["validation.npz"]))
    ids, mask, y = val["x_val"][:, 0], val["x_val"][:, 1], val["y_val"]

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = files["folder"].parent / "downloaded"
    with zipfile.ZipFile(io.BytesIO(downloaded["student_hf.zip"])) as zf:
        zf.extractall(folder)
    student = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert student.config.id2label[2] == "data"
    assert (
        AutoTokenizer.from_pretrained(folder)("the for statement")["input_ids"]
        == (AutoTokenizer.from_pretrained(files["folder"])("the for statement")["input_ids"])
    )
    with torch.no_grad():
        logits = student(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    assert float((logits.logits.numpy().argmax(1) == y).mean()) == pytest.approx(reported, abs=1e-9)

    import onnxruntime as ort

    session = ort.InferenceSession(downloaded["student.onnx"], providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    (onnx_logits,) = session.run(None, {"input_ids": ids, "attention_mask": mask})
    assert float((onnx_logits.argmax(1) == y).mean()) == pytest.approx(reported, abs=1e-9)


def _download_all(http: httpx.Client, job_id: str) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for art in http.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]:
        r = http.get(f"/v1/artifacts/{art['id']}/content")
        assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == art["sha256"]
        out[art["name"]] = r.content
    return out
