"""A causal-LM job stopped after its first epoch and run again on the same work folder goes on
from its checkpoint and ends where an uninterrupted run ends."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load as load_safetensors

from core.distill.causal import cache as lm_cache
from core.distill.pipeline import run_job
from core.distill.types import Event, JobOutcome, ModelFile
from core.errors import Cancelled
from core.spec import JobSpec
from tests.core.causal_files import corpus, train_teacher, write_text_jsonl, zip_folder


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """Tiny models train many times faster on one thread of a busy two-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return corpus()


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory, texts: list[str]) -> Path:
    root = tmp_path_factory.mktemp("gpt")
    train_teacher(root / "teacher", texts, steps=60)  # a weak teacher is enough here
    return zip_folder(root / "teacher", root / "teacher.zip")


def _data(path: Path, texts: list[str], prompts: bool) -> Path:
    if not prompts:
        return write_text_jsonl(path, texts[:80], 8)
    import json

    rows = []
    for i, text in enumerate(texts[:60]):
        words = text.split()
        rows.append(
            {"prompt": " ".join(words[:6]), "completion": " " + " ".join(words[6:24])}
            | ({"split": "val"} if i % 10 == 0 else {})
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _spec(method: dict[str, Any]) -> JobSpec:
    return JobSpec.model_validate(
        {
            "teacher": {"path": "teacher"},
            "dataset_path": "data.jsonl",
            "student": {"from_teacher": {"layers": 2, "hidden_size": 32}},
            "distillation": method,
            "training": {"epochs": 2, "batch_size": 16, "lr": 3e-3, "max_length": 48, "seed": 3},
            "export": ["hf"],
        }
    )


def _run(
    spec: JobSpec, teacher: Path, data: Path, work: Path, out: Path, stop_after: int | None = None
) -> tuple[JobOutcome, list[Event]]:
    """The job; with ``stop_after``, cancelled once the student finished that many epochs."""
    events: list[Event] = []
    stop = {"now": False}

    def progress(event: Event) -> None:
        events.append(event)
        data = event.data
        if event.type == "metrics" and data.get("label") == "student":
            stop["now"] = stop_after is not None and data["epoch"] >= stop_after

    outcome = run_job(
        spec,
        models={"teacher": ModelFile(teacher, "hf")},
        dataset=data,
        out_dir=out,
        work_dir=work,
        progress=progress,
        should_stop=lambda: stop["now"],
    )
    return outcome, events


def _weights(out: Path) -> dict[str, torch.Tensor]:
    with zipfile.ZipFile(out / "student_hf.zip") as zf:
        return load_safetensors(zf.read("model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "method",
    [
        {"method": "kd", "temperature": 1.0, "alpha": 0.5},
        {"method": "hidden"},
        {"method": "gkd", "lmbda": 0.5, "generate": {"max_new_tokens": 8}},
        {"method": "seqkd", "generate": {"max_new_tokens": 8}},
    ],
    ids=lambda m: m["method"],
)
def test_a_job_stopped_after_epoch_1_resumes_and_ends_as_an_uninterrupted_one(
    teacher: Path, tmp_path: Path, texts: list[str], method: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv(lm_cache.CACHE_ENV, str(tmp_path / "lm-cache"))
    spec = _spec(method)
    data = _data(tmp_path / "data.jsonl", texts, prompts=method["method"] in ("gkd", "seqkd"))
    full, _ = _run(spec, teacher, data, tmp_path / "work-full", tmp_path / "full")

    work = tmp_path / "work"
    with pytest.raises(Cancelled):
        _run(spec, teacher, data, work, tmp_path / "stopped", stop_after=1)
    saved = torch.load(work / "student-stage1.pt", weights_only=True)
    assert saved["epoch"] == 1 and not saved["finished"]
    assert not (work / "baseline-stage2.pt").exists()
    if method["method"] == "hidden":  # the projections are trained and saved with the student
        assert saved["method"] and all(k.startswith("projections.") for k in saved["method"])

    resumed, events = _run(spec, teacher, data, work, tmp_path / "resumed")
    logs = [e.data["message"] for e in events if e.type == "log"]
    assert "resumed from student-stage1.pt after epoch 1" in logs
    trained = [(e.data["label"], e.data["epoch"]) for e in events if e.type == "metrics"]
    assert trained == [("student", 2), ("baseline", 1), ("baseline", 2)]  # epoch 1 not redone

    def steps(outcome: JobOutcome) -> list[tuple[str, int, int]]:
        return [(r["label"], r["epoch"], r["step"]) for r in outcome.history]

    assert steps(resumed) == steps(full)  # the report keeps the restored epoch too
    expected, got = _weights(tmp_path / "full"), _weights(tmp_path / "resumed")
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    assert resumed.result["student"]["perplexity"] == pytest.approx(
        full.result["student"]["perplexity"], rel=1e-5
    )
    assert resumed.result["baseline"]["perplexity"] == pytest.approx(
        full.result["baseline"]["perplexity"], rel=1e-5
    )


@pytest.mark.slow
def test_a_checkpoint_of_other_settings_is_not_resumed(
    teacher: Path, tmp_path: Path, texts: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(lm_cache.CACHE_ENV, str(tmp_path / "lm-cache"))
    data = _data(tmp_path / "data.jsonl", texts, prompts=False)
    spec = _spec({"method": "kd"})
    work = tmp_path / "work"
    with pytest.raises(Cancelled):
        _run(spec, teacher, data, work, tmp_path / "stopped", stop_after=1)
    other = spec.model_copy(update={"training": spec.training.model_copy(update={"lr": 1e-3})})
    _, events = _run(other, teacher, data, work, tmp_path / "out")
    logs = [e.data["message"] for e in events if e.type == "log"]
    assert "ignoring student-stage1.pt: it belongs to a different run" in logs
    trained = [(e.data["label"], e.data["epoch"]) for e in events if e.type == "metrics"]
    assert trained[:2] == [("student", 1), ("student", 2)]  # started over
