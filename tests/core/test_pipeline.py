"""The job pipeline end to end on digits: teacher file in, measured and reloadable artifacts out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from cli.digits import DigitsCNN, train_classifier
from core.distill.evaluate import VERDICTS
from core.distill.pipeline import run_job
from core.distill.types import Event, ModelFile
from core.errors import Cancelled, ShapeMismatch
from core.spec import parse_spec

QUALITY_KEYS = {"accuracy", "f1_macro", "parameters", "size_bytes"}
SPEED_KEYS = {"latency_ms_p50", "throughput_per_s"}
TINY = {"epochs": 3, "batch_size": 32, "early_stopping_patience": None, "lr": 0.01}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models train fastest on one thread, and far faster when other processes share the
    CPU (OpenMP threads spin against each other); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def export_program(model: nn.Module, path: Path, example: torch.Tensor) -> ModelFile:
    """A teacher saved the way users are told to: torch.export with a dynamic batch."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    return ModelFile(path=path, format="exported_program")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, digits_teacher: nn.Module, digits: dict):
    """teacher.pt2, a TorchScript second teacher, and labelled / unlabelled transfer sets."""
    root = tmp_path_factory.mktemp("pipeline")
    example = torch.from_numpy(digits["x_train"][:2])
    teacher = export_program(digits_teacher, root / "teacher.pt2", example)
    torch.manual_seed(1)
    second = train_classifier(DigitsCNN(width=8), digits["x_train"], digits["y_train"], epochs=8)
    torch.jit.save(torch.jit.script(second), str(root / "second.pt"))
    labelled = root / "digits.npz"
    np.savez(
        labelled,
        x=digits["x_train"],
        y=digits["y_train"],
        x_val=digits["x_test"],
        y_val=digits["y_test"],
    )
    unlabelled = root / "unlabelled.npz"
    np.savez(unlabelled, x=digits["x_train"][:600])
    return {
        "root": root,
        "models": {
            "teacher.pt2": teacher,
            "second.pt": ModelFile(path=root / "second.pt", format="torchscript"),
        },
        "labelled": labelled,
        "unlabelled": unlabelled,
    }


def run(files: dict, tmp_path: Path, spec: dict[str, Any], dataset: str = "labelled", **kw: Any):
    events: list[Event] = []
    body = {"teacher": {"path": "teacher.pt2"}, "dataset_path": "x.npz", **spec}
    body["training"] = {**TINY, **spec.get("training", {})}
    outcome = run_job(
        parse_spec(body),
        models=files["models"],
        dataset=files[dataset],
        dataset_options={},
        out_dir=tmp_path / "out",
        work_dir=tmp_path / "work",
        progress=events.append,
        should_stop=kw.pop("should_stop", lambda: False),
    )
    return outcome, events


def files_val_y(files: dict) -> np.ndarray:
    return np.load(files["labelled"])["y_val"]


def accuracy(outputs: np.ndarray, y: np.ndarray) -> float:
    return float((outputs.argmax(-1) == y).mean())


def test_full_run_reports_api_result_and_artifacts_reproduce_it(files, tmp_path):
    outcome, events = run(files, tmp_path, {"student": {"preset": "mlp", "width": 32}})
    result = outcome.result

    # API.md's result, plus the engine's extras.
    for side in ("teacher", "student"):
        assert set(result[side]) >= QUALITY_KEYS | SPEED_KEYS, side
        assert 0.0 <= result[side]["accuracy"] <= 1.0
        assert isinstance(result[side]["parameters"], int)
        assert result[side]["latency_ms_p50"] > 0
    assert 0 <= result["student"]["agreement"] <= 1
    assert result["teacher"]["accuracy"] > 0.95  # the fixture's teacher, measured on x_val
    assert result["student"]["accuracy"] > 0.8
    assert result["student"]["parameters"] < result["teacher"]["parameters"]
    assert result["parameter_ratio"] == pytest.approx(
        result["teacher"]["parameters"] / result["student"]["parameters"], rel=1e-3
    )
    assert result["size_ratio"] == pytest.approx(
        result["teacher"]["size_bytes"] / result["student"]["size_bytes"], rel=1e-3
    )
    assert result["compression_ratio"] == result["parameter_ratio"]
    assert isinstance(result["speedup"], float)
    low, high = result["speedup_range"]
    assert low <= result["speedup"] <= high
    # Teacher, student and baseline timed in alternating rounds, the student under onnxruntime too.
    assert result["timing"]["interleaved"] is True and result["timing"]["rounds"] >= 3
    assert result["timing"]["speedup_runtime"] == "torch"
    # Where the job's time went: every phase, adding up to the whole.
    phases = result["seconds_by_phase"]
    assert {"load", "training", "baseline", "evaluation", "export", "timing"} <= set(phases)
    assert sum(phases.values()) == pytest.approx(result["seconds"], abs=0.5)
    assert isinstance(result["timing"]["noisy"], bool)
    for side in ("teacher", "student", "baseline"):
        low, high = result[side]["latency_ms_range"]
        assert 0 < low <= result[side]["latency_ms_p50"] <= high, side
    assert result["student"]["latency_ms_p50_onnx"] > 0
    assert result["student"]["throughput_per_s_onnx"] > 0
    # The verdict against the labels-only baseline, with its test.
    assert result["verdict"] in VERDICTS
    assert result["baseline_comparison"]["test"] == "mcnemar_exact"
    assert result["baseline_comparison"]["n"] == len(files_val_y(files))
    assert result["recommended"] == (
        "baseline" if result["verdict"] == "baseline_better" else "student"
    )
    # The last metrics event is the delivered student's (the job's top-level metrics after success);
    # every epoch's row carries its optimizer step.
    metrics = [e.data for e in events if e.type == "metrics"]
    assert metrics[-1]["label"] == "delivered student" and metrics[-1]["final"] is True
    assert metrics[-1]["val_accuracy"] == result["student"]["accuracy"]
    assert all(m["step"] > 0 for m in metrics[:-1])
    assert result["task"] == "classification" and result["method"] == "kd"
    assert result["device"] == "cpu"
    assert len(result["stages"]) == 1
    assert set(result["baseline"]) >= QUALITY_KEYS

    out = tmp_path / "out"
    names = {a.name: a.kind for a in outcome.artifacts}
    expected = {
        "student.pt": "student_torchscript",
        "student.onnx": "student_onnx",
        "student.safetensors": "student_safetensors",
        "student.arch.json": "student_arch",
        "validation.npz": "validation_data",
        "report.json": "report",
    }
    if result["verdict"] == "baseline_better":  # 3 epochs: plain CE may well win
        expected.update(
            {
                "baseline.pt": "baseline_torchscript",
                "baseline.onnx": "baseline_onnx",
                "baseline.safetensors": "baseline_safetensors",
                "baseline.arch.json": "baseline_arch",
            }
        )
    assert names == expected
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    assert all(a.path.parent == out for a in outcome.artifacts)
    # Nothing left beside the output folder but the work folder.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "work"]

    report = json.loads((out / "report.json").read_text())
    assert report["result"]["student"]["accuracy"] == result["student"]["accuracy"]
    assert report["spec"]["task"] == "classification"
    epochs = [h for h in report["history"] if h.get("stage") == 1]
    assert len(epochs) == TINY["epochs"] and all("train_loss" in h for h in epochs)
    fractions = [e.data["fraction"] for e in events if e.type == "progress"]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)

    val = np.load(out / "validation.npz")
    x_val, y_val = val["x_val"], val["y_val"]
    assert accuracy(val["teacher_outputs"], y_val) == result["teacher"]["accuracy"]
    reported = result["student"]["accuracy"]

    scripted = torch.jit.load(str(out / "student.pt"))
    with torch.no_grad():
        ts_out = scripted(torch.from_numpy(x_val)).numpy()
    np.testing.assert_allclose(ts_out, val["student_outputs"], atol=1e-6, rtol=0)
    assert accuracy(ts_out, y_val) == reported

    from safetensors.torch import load_file

    from core.distill.architectures import build_architecture

    arch = json.loads((out / "student.arch.json").read_text())
    rebuilt = build_architecture(arch["name"], arch["config"])
    rebuilt.load_state_dict(load_file(str(out / "student.safetensors")))
    with torch.no_grad():
        st_out = rebuilt.eval()(torch.from_numpy(x_val)).numpy()
    np.testing.assert_allclose(st_out, val["student_outputs"], atol=1e-6, rtol=0)
    assert accuracy(st_out, y_val) == reported

    import onnxruntime as ort

    session = ort.InferenceSession(str(out / "student.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {session.get_inputs()[0].name: x_val})[0]
    tolerance = result["export"]["onnx"]["max_abs_diff"]
    assert np.abs(onnx_out - val["student_outputs"]).max() <= max(tolerance, 1e-6) * 1.01
    assert accuracy(onnx_out, y_val) == reported


def test_a_teacher_wrong_on_most_inputs_loses_to_the_baseline_and_the_job_says_so(
    files, digits, tmp_path
):
    """All labels given and a teacher that learned the wrong class for every digit: the
    distilled student follows the teacher, the labels-only baseline wins, and the job says so
    in the result, in a log event, and hands out the baseline's files beside the student's."""
    torch.manual_seed(2)
    wrong = (digits["y_train"] + 3) % 10
    bad = train_classifier(DigitsCNN(width=8), digits["x_train"], wrong, epochs=8)
    example = torch.from_numpy(digits["x_train"][:2])
    models = {**files["models"], "bad.pt2": export_program(bad, tmp_path / "bad.pt2", example)}
    spec = {"teacher": {"path": "bad.pt2"}, "student": {"preset": "mlp", "width": 32}}
    outcome, events = run({**files, "models": models}, tmp_path / "job", spec)
    result = outcome.result

    assert result["teacher"]["accuracy"] < 0.2
    assert result["baseline"]["accuracy"] > result["student"]["accuracy"] + 0.3
    assert result["verdict"] == "baseline_better"
    comparison = result["baseline_comparison"]
    assert comparison["p_value"] < 0.05
    assert comparison["baseline_only_correct"] > comparison["student_only_correct"]
    assert result["recommended"] == "baseline"
    assert "baseline beat the distilled student" in result["warning"]
    logs = [e.data["message"] for e in events if e.type == "log"]
    assert any(m.startswith("warning: the labels-only baseline beat") for m in logs), logs
    final = [e.data for e in events if e.type == "metrics"][-1]
    assert final["verdict"] == "baseline_better"
    assert final["val_accuracy"] == result["student"]["accuracy"]

    # The better student is offered: the baseline exported in every requested format.
    kinds = {a.kind: a.path for a in outcome.artifacts}
    assert {"student_onnx", "baseline_onnx", "baseline_torchscript", "baseline_safetensors"} <= set(
        kinds
    )
    import onnxruntime as ort

    val = np.load(files["labelled"])
    session = ort.InferenceSession(str(kinds["baseline_onnx"]), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: val["x_val"]})[0]
    assert accuracy(out, val["y_val"]) == pytest.approx(result["baseline"]["accuracy"], abs=0.01)


def test_an_onnx_teacher_is_compared_with_the_student_under_onnxruntime(
    files, digits_teacher, digits, tmp_path
):
    """The speedup compares like with like: an ONNX teacher runs under onnxruntime, so the
    speedup is taken against the student under onnxruntime, timed in the same rounds."""
    from tests.core.model_files import save_onnx

    path = save_onnx(
        digits_teacher, tmp_path / "teacher.onnx", torch.from_numpy(digits["x_train"][:2])
    )
    models = {**files["models"], "teacher.onnx": ModelFile(path=path, format="onnx")}
    spec = {
        "teacher": {"path": "teacher.onnx"},
        "student": {"preset": "mlp", "width": 16, "depth": 1},
        "training": {"epochs": 1, "baseline": False},
        "export": [],  # no ONNX asked for: the student is exported for the timing alone
    }
    outcome, _ = run({**files, "models": models}, tmp_path / "job", spec)
    result = outcome.result
    assert result["timing"]["speedup_runtime"] == "onnxruntime"
    assert result["student"]["latency_ms_p50_onnx"] > 0
    low, high = result["speedup_range"]
    assert low <= result["speedup"] <= high
    # The median of per-round ratios sits near the ratio of the medians, in the same runtime.
    ratio = result["teacher"]["latency_ms_p50"] / result["student"]["latency_ms_p50_onnx"]
    assert low / 1.5 <= ratio <= high * 1.5
    assert [a.name for a in outcome.artifacts] == ["validation.npz", "report.json"]


def test_the_report_states_how_to_call_the_student_and_the_onnx_file_agrees(files, tmp_path):
    import onnxruntime as ort

    outcome, _ = run(files, tmp_path, {"student": {"preset": "mlp", "width": 16}})
    io = json.loads((tmp_path / "out" / "report.json").read_text())["result"]["student_io"]
    assert io == outcome.result["student_io"]
    contract = io["input"]
    assert contract["shape"] == [None, 1, 8, 8] and contract["dtype"] == "float32"
    assert "scaling" in contract["preprocessing"]
    # digits / 16: the range a user compares their own inputs against.
    assert contract["x_range"] == [0.0, 1.0] and 0 < contract["x_mean"] < 1
    assert io["output"]["shape"] == [None, 10] and "argmax" in io["output"]["meaning"]

    # Following the contract, and nothing else, runs the ONNX student.
    session = ort.InferenceSession(str(tmp_path / "out" / "student.onnx"))
    (declared,) = session.get_inputs()
    assert declared.name == contract["name"]
    assert declared.shape[1:] == contract["shape"][1:]
    batch = np.zeros([5, *contract["shape"][1:]], dtype=contract["dtype"])
    (scores,) = session.run([io["output"]["name"]], {contract["name"]: batch})
    assert list(scores.shape) == [5, *io["output"]["shape"][1:]]


def test_ensemble_and_two_stage_chain_report_every_stage(files, tmp_path):
    spec = {
        "teacher": None,
        "teachers": [
            {"path": "teacher.pt2", "weight": 2.0},
            {"path": "second.pt", "weight": 1.0},
        ],
        "stages": [
            {"student": {"preset": "cnn", "width": 8, "depth": 2}},
            {"student": {"preset": "mlp", "width": 16, "depth": 1}},
        ],
        "export": ["torchscript"],
    }
    outcome, events = run(files, tmp_path, spec)
    result = outcome.result
    assert [s["stage"] for s in result["stages"]] == [1, 2]
    assert [s["student"]["preset"] for s in result["stages"]] == ["cnn", "mlp"]
    for stage in result["stages"]:
        assert 0 <= stage["accuracy"] <= 1 and stage["parameters"] > 0
    # The final stage is the result; the baseline is the last stage's architecture.
    assert result["student"]["accuracy"] == result["stages"][-1]["accuracy"]
    assert result["baseline"]["parameters"] == result["student"]["parameters"]
    # Teacher size covers both members of the ensemble.
    sizes = sum(f.path.stat().st_size for f in files["models"].values())
    assert result["teacher"]["size_bytes"] == sizes
    progress = [e.data for e in events if e.type == "progress"]
    assert {p["stages"] for p in progress} == {3}  # two stages plus the baseline
    assert sorted({p["stage"] for p in progress}) == [1, 2, 3]
    fractions = [p["fraction"] for p in progress]
    assert fractions == sorted(fractions)
    expected = {"student.pt", "validation.npz", "report.json"}
    if result["verdict"] == "baseline_better":
        expected.add("baseline.pt")
    assert {a.name for a in outcome.artifacts} == expected


def test_no_labels_means_no_baseline_and_teacher_agreement_only(files, tmp_path):
    spec = {
        "student": {"preset": "mlp", "width": 16},
        "training": {"val_fraction": 0.2},
        "export": ["safetensors"],
    }
    outcome, _ = run(files, tmp_path, spec, dataset="unlabelled")
    result = outcome.result
    assert "baseline" not in result
    assert result["task"] == "classification"
    assert "accuracy" not in result["student"]
    assert 0 <= result["student"]["agreement"] <= 1
    assert len(np.load(tmp_path / "out" / "validation.npz")["x_val"]) == 120


def test_labels_with_baseline_off_skip_the_baseline(files, tmp_path):
    spec = {
        "student": {"preset": "mlp", "width": 8, "depth": 1},
        "training": {"epochs": 1, "baseline": False},
        "export": [],
    }
    outcome, events = run(files, tmp_path, spec)
    assert "baseline" not in outcome.result
    assert {e.data["stages"] for e in events if e.type == "progress"} == {1}


def test_structured_pruning_reports_before_and_after(files, tmp_path):
    spec = {
        "student": {"preset": "mlp", "width": 64},
        "compression": {"prune": {"amount": 0.5, "structured": True}},
        "training": {"baseline": False},
        "export": ["torchscript", "onnx"],
    }
    outcome, _ = run(files, tmp_path, spec)
    result = outcome.result
    [step] = result["compression"]
    assert step["step"] == "prune" and step["structured"] is True
    before, after = step["before"], step["after"]
    for metrics in (before, after):
        assert {"parameters", "size_bytes", "latency_ms_p50", "accuracy"} <= set(metrics)
    assert after["parameters"] < 0.6 * before["parameters"]
    assert after["size_bytes"] < before["size_bytes"]
    # The compressed model is the result, and it is the one exported.
    assert result["student"]["parameters"] == after["parameters"]
    assert result["student"]["accuracy"] == after["accuracy"]
    scripted = torch.jit.load(str(tmp_path / "out" / "student.pt"))
    assert sum(p.numel() for p in scripted.parameters()) == after["parameters"]


def test_rerun_with_the_same_work_dir_resumes_from_checkpoints(files, tmp_path):
    spec = {"student": {"preset": "mlp", "width": 16, "depth": 1}, "export": ["torchscript"]}
    first, _ = run(files, tmp_path, spec)
    (tmp_path / "out").rename(tmp_path / "first")
    second, events = run(files, tmp_path, spec)
    resumed = [e.data["message"] for e in events if "resumed" in e.data.get("message", "")]
    assert len(resumed) == 2  # the distilled stage and the baseline
    epochs = [e for e in events if e.type == "metrics" and not e.data.get("final")]
    assert not epochs  # no epoch trained again
    assert second.result["student"]["accuracy"] == first.result["student"]["accuracy"]
    assert second.result["baseline"]["accuracy"] == first.result["baseline"]["accuracy"]
    # The report still holds every epoch of both runs' training.
    assert len(first.history) == 2 * TINY["epochs"]
    assert second.history == first.history


def test_cancelled_job_leaves_nothing_in_out_dir(files, tmp_path):
    spec = {"student": {"preset": "mlp", "width": 8, "depth": 1}}
    calls = {"n": 0}

    def stop_after_a_while() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    with pytest.raises(Cancelled):
        run(files, tmp_path, spec, should_stop=stop_after_a_while)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["work"]


def test_teacher_that_cannot_take_the_data_is_a_shape_mismatch(files, tmp_path):
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x=np.zeros((50, 1, 6, 6), np.float32), y=np.arange(50) % 10)
    files = {**files, "wrong": wrong}
    with pytest.raises(ShapeMismatch) as err:
        run(files, tmp_path, {"training": {"batch_size": 8}}, dataset="wrong")
    assert err.value.details["field"] == "teacher"
    assert "8" in err.value.message  # names the teacher's input shape
    assert not (tmp_path / "out").exists()
