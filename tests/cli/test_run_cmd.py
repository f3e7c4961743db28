"""`distill run` on the sample spec from examples/, and its answers to user mistakes."""

from __future__ import annotations

import importlib.util
import json
import pickle
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import yaml
from typer.testing import CliRunner

from cli.app import app

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "digits"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models train fastest on one thread, and far faster when other processes share the
    CPU (OpenMP threads spin against each other); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def example_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_files", EXAMPLE / "make_files.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example's files, made as examples/digits/make_files.py makes them (seconds)."""
    root = tmp_path_factory.mktemp("example")
    teacher, data, accuracy = example_module().make_files(root)
    assert (teacher, data) == (root / "teacher.pt2", root / "digits.npz") and accuracy > 0.9
    return root


def write_spec(folder: Path, name: str = "spec.yaml", **changes: Any) -> Path:
    """The sample spec with a tiny training budget and ``changes`` applied (None deletes)."""
    spec = yaml.safe_load((EXAMPLE / "spec.yaml").read_text())
    spec["training"].update(epochs=2, early_stopping_patience=None)
    for key, value in changes.items():
        if value is None:
            spec.pop(key, None)
        else:
            spec[key] = value
    path = folder / name
    path.write_text(yaml.safe_dump(spec) if name.endswith(".yaml") else json.dumps(spec))
    return path


def invoke(*args: str | Path) -> Any:
    return CliRunner().invoke(app, ["run", *map(str, args)])


@pytest.mark.slow
def test_sample_spec_runs_and_writes_artifacts(example_dir: Path, tmp_path: Path):
    spec = write_spec(example_dir)
    out = tmp_path / "artifacts"
    result = invoke(spec, "--out", out)
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} >= {
        "student.pt",
        "student.onnx",
        "student.safetensors",
        "student.arch.json",
        "report.json",
        "validation.npz",
    }
    report = json.loads((out / "report.json").read_text())["result"]
    for column in ("teacher", "student", "baseline"):
        assert column in result.output
    assert "smaller than the teacher" in result.output and "speedup" in result.output
    assert "verdict: " in result.output
    assert f"{100 * report['student']['accuracy']:.2f} %" in result.output
    # The sample spec prunes: before/after is shown.
    assert "Compression" in result.output and report["compression"][0]["step"] == "prune"
    # The default work folder is removed after a successful run.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifacts"]


@pytest.mark.slow
def test_json_spec_and_json_output(example_dir: Path, tmp_path: Path):
    spec = write_spec(
        example_dir,
        "spec.json",
        compression=None,
        export=["safetensors"],
        student={"preset": "mlp", "width": 16, "depth": 1},
    )
    result = invoke(spec, "--out", tmp_path / "out", "--json", "--work-dir", tmp_path / "w")
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert body["student"]["parameters"] < body["teacher"]["parameters"]
    assert body["compression"] == []
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        "student.safetensors",
        "student.arch.json",
        "report.json",
        "validation.npz",
    }


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"training": {"epochs": 0}}, "training.epochs"),
        ({"studnet": {"preset": "mlp"}}, "studnet"),
        ({"distillation": {"method": "kd", "temperature": -1}}, "distillation.temperature"),
        ({"dataset_path": "missing.npz"}, "dataset_path"),
        ({"teacher": {"path": "nowhere.pt2"}}, "teacher.path"),
        ({"teacher": {"model_id": "mdl_123"}}, "teacher.model_id"),
    ],
)
def test_bad_spec_exits_2_naming_the_field(
    example_dir: Path, tmp_path: Path, changes: dict, field: str
):
    spec = write_spec(example_dir, "bad.yaml", **changes)
    result = invoke(spec, "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert field in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_unreadable_spec_file_exits_2(tmp_path: Path):
    broken = tmp_path / "spec.yaml"
    broken.write_text("teacher: [unclosed\n")
    result = invoke(broken, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert "not valid YAML" in result.output


def test_pickled_teacher_is_refused_with_exit_1(example_dir: Path, tmp_path: Path):
    (tmp_path / "teacher.pkl").write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    (tmp_path / "digits.npz").symlink_to(example_dir / "digits.npz")
    spec = write_spec(tmp_path, teacher={"path": "teacher.pkl"})
    result = invoke(spec, "--out", tmp_path / "out")
    assert result.exit_code == 1, result.output
    assert "unsafe_model_file" in result.output and "pickle" in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
