"""The default recipe on teachers and data nobody tuned for, with only a teacher and a dataset
given: (a) breast_cancer with a random forest, (b) wine with a scaler + logistic regression
pipeline, (c) digits with a CNN, (d) a shifted 1-D pattern (like MNIST-1D) with a 1-D CNN.

Each job's student is read back from its exported ONNX file and measured on a held-out test
split with the raw inputs the teacher takes. Against it runs the tutorial loop a user would
write (Adam lr 1e-2, cosine, T = 4, α = 0.9, the same student, epochs and batch size).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from cli.digits import DigitsCNN, train_classifier
from core.distill.pipeline import run_job
from core.distill.students import build_student
from core.distill.teachers import load_teacher
from core.distill.types import ModelFile
from core.spec import StudentSpec, parse_spec


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- the four tasks ----------------------------------------------------------------------------


def _split(x: np.ndarray, y: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    from sklearn.model_selection import train_test_split

    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    return {"x": x_tr, "y": y_tr, "x_test": x_te, "y_test": y_te}


def _sklearn_task(folder: Path, data: dict[str, np.ndarray], model: Any) -> tuple[Path, str]:
    from skl2onnx import to_onnx

    model.fit(data["x"], data["y"])
    onnx = to_onnx(model, data["x"][:1], options={"zipmap": False})
    path = folder / "teacher.onnx"
    path.write_bytes(onnx.SerializeToString())
    return path, "onnx"


def breast_cancer(folder: Path) -> tuple[dict[str, np.ndarray], Path, str]:
    from sklearn.datasets import load_breast_cancer
    from sklearn.ensemble import RandomForestClassifier

    bunch = load_breast_cancer()
    data = _split(bunch.data.astype(np.float32), bunch.target.astype(np.int64))
    forest = RandomForestClassifier(n_estimators=50, random_state=0)
    return data, *_sklearn_task(folder, data, forest)


def wine(folder: Path) -> tuple[dict[str, np.ndarray], Path, str]:
    from sklearn.datasets import load_wine
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    bunch = load_wine()
    data = _split(bunch.data.astype(np.float32), bunch.target.astype(np.int64))
    pipeline = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    return data, *_sklearn_task(folder, data, pipeline)


def _export_teacher(module: nn.Module, example: torch.Tensor, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.export.export(module.eval(), (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))


def digits(folder: Path) -> tuple[dict[str, np.ndarray], Path, str]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    data = _split((bunch.images / 16.0).astype(np.float32)[:, None], bunch.target)
    torch.manual_seed(0)
    teacher = train_classifier(DigitsCNN(), data["x"], data["y"])
    path = folder / "teacher.pt2"
    _export_teacher(teacher, torch.from_numpy(data["x"][:2]), path)
    return data, path, "exported_program"


def shifted_patterns(
    n: int, length: int = 40, classes: int = 10, noise: float = 0.75, seed: int = 0
) -> tuple:
    """MNIST-1D-like: one of ``classes`` fixed patterns (12 points) at a random offset in a
    noisy signal with a random gain; only the pattern, not its place, names the class."""
    rng = np.random.default_rng(seed)
    templates = np.random.default_rng(1234).normal(size=(classes, 12)).cumsum(1)
    templates -= templates.mean(1, keepdims=True)
    y = rng.integers(0, classes, n)
    x = rng.normal(scale=noise, size=(n, length))
    offsets = rng.integers(0, length - 12 + 1, n)
    gains = rng.uniform(0.7, 1.3, n)
    for i in range(n):
        x[i, offsets[i] : offsets[i] + 12] += gains[i] * templates[y[i]]
    return x.astype(np.float32), y.astype(np.int64)


class SignalCNN(nn.Module):
    """A small 1-D CNN for (N, L) signals: translation invariant by its global max-pool."""

    def __init__(self, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(1, width, 5, padding=2),
            nn.ReLU(),
            nn.Conv1d(width, width, 5, padding=2),
            nn.ReLU(),
            nn.Conv1d(width, width, 5, padding=2),
            nn.ReLU(),
            nn.AdaptiveMaxPool1d(1),
            nn.Flatten(),
            nn.Linear(width, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.unsqueeze(1))


def signal(folder: Path) -> tuple[dict[str, np.ndarray], Path, str]:
    x, y = shifted_patterns(4000)
    data = _split(x, y)
    torch.manual_seed(0)
    teacher = train_classifier(SignalCNN(), data["x"], data["y"], epochs=30)
    path = folder / "teacher.pt2"
    _export_teacher(teacher, torch.from_numpy(data["x"][:2]), path)
    return data, path, "exported_program"


# --- running them ------------------------------------------------------------------------------


def run_default(
    folder: Path, data: dict[str, np.ndarray], teacher: Path, fmt: str, **given: Any
) -> dict:
    """``distill run`` with only the teacher and the dataset (and ``given`` fields); the job's
    result and the test accuracy of its exported ONNX student on raw inputs."""
    np.savez(folder / "data.npz", x=data["x"], y=data["y"])
    body = {"teacher": {"path": str(teacher)}, "dataset_path": "data.npz", **given}
    spec = parse_spec(body)
    outcome = run_job(
        spec,
        models={str(teacher): ModelFile(teacher, fmt)},
        dataset=folder / "data.npz",
        out_dir=folder / "out",
        work_dir=folder / "work",
    )
    session = ort.InferenceSession(str(folder / "out" / "student.onnx"))
    name = session.get_inputs()[0].name
    logits = session.run(None, {name: data["x_test"]})[0]
    return {
        "result": outcome.result,
        "student_accuracy": float((logits.argmax(1) == data["y_test"]).mean()),
    }


def teacher_accuracy(teacher: Path, fmt: str, data: dict[str, np.ndarray]) -> float:
    loaded = load_teacher(ModelFile(teacher, fmt), "cpu", data["x"].shape[1:])
    out = loaded.predict(torch.from_numpy(data["x_test"]))
    return float((out.argmax(1).numpy() == data["y_test"]).mean())


def tutorial_loop(
    data: dict[str, np.ndarray], teacher: Path, fmt: str, completed: dict[str, Any]
) -> float:
    """The KD loop of the PyTorch tutorial on the same student, epochs and batch size: Adam at
    lr 1e-2 with a cosine schedule, T = 4, α = 0.9, on all the training data."""
    torch.manual_seed(0)
    x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
    loaded = load_teacher(ModelFile(teacher, fmt), "cpu", x.shape[1:])
    teacher_out = loaded.predict(x).float()
    student = build_student(
        StudentSpec.model_validate(completed["student"]),
        input_shape=x.shape[1:],
        input_dtype=x.dtype,
        output_dim=teacher_out.shape[1],
        inputs=x,
    )
    epochs = int(_number(completed["training"]["epochs"]))
    batch = int(_number(completed["training"]["batch_size"]))
    steps = epochs * math.ceil(len(x) / batch)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    t, alpha = 4.0, 0.9
    student.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), batch):
            idx = perm[i : i + batch]
            out = student(x[idx])
            soft = F.kl_div(
                F.log_softmax(out / t, 1), F.softmax(teacher_out[idx] / t, 1), reduction="batchmean"
            )
            loss = alpha * t * t * soft + (1 - alpha) * F.cross_entropy(out, y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    student.eval()
    with torch.no_grad():
        pred = student(torch.from_numpy(data["x_test"])).argmax(1).numpy()
    return float((pred == data["y_test"]).mean())


def _number(value: Any) -> float:
    return value["auto"] if isinstance(value, dict) else value


TASKS = {"breast_cancer": breast_cancer, "wine": wine, "digits": digits, "signal": signal}
# The settings of issue 15's comparison on the 1-D task; everything else left to the recipe.
ISSUE_SETTINGS = {
    "student": {"preset": "mlp", "width": 128, "depth": 2},
    "training": {"epochs": 30, "batch_size": 128},
}


def measure(name: str, folder: Path, **given: Any) -> dict[str, Any]:
    data, teacher, fmt = TASKS[name](folder)
    job = run_default(folder, data, teacher, fmt, **given)
    result = job["result"]
    return {
        **job,
        "teacher_accuracy": teacher_accuracy(teacher, fmt, data),
        "tutorial_accuracy": tutorial_loop(data, teacher, fmt, result["spec"]),
    }


# --- the tests ---------------------------------------------------------------------------------


def check(job: dict[str, Any], student_can_reach: bool) -> None:
    result = job["result"]
    summary = (
        f"teacher {job['teacher_accuracy']:.3f}, student {job['student_accuracy']:.3f}, "
        f"tutorial loop {job['tutorial_accuracy']:.3f}; recipe {result['recipe']['chosen']}"
    )
    if student_can_reach:
        assert job["student_accuracy"] >= 0.95 * job["teacher_accuracy"], summary
    assert result["student"]["parameters"] <= result["teacher"]["parameters"], summary
    assert job["tutorial_accuracy"] <= job["student_accuracy"] + 0.01, summary
    chosen = result["recipe"]["chosen"]
    assert {"training.lr", "training.batch_size", "training.epochs"} <= set(chosen), chosen


@pytest.mark.slow
@pytest.mark.parametrize("name", ["breast_cancer", "wine", "digits"])
def test_default_student_reaches_the_teacher_and_the_tutorial_loop(name, tmp_path):
    check(measure(name, tmp_path), student_can_reach=True)


@pytest.mark.slow
def test_default_mlp_on_shifted_patterns_is_not_beaten_by_the_tutorial_loop(tmp_path):
    job = measure("signal", tmp_path)
    # The task is the one an MLP cannot solve: the teacher stays well ahead.
    assert job["student_accuracy"] < job["teacher_accuracy"] - 0.05, job
    check(job, student_can_reach=False)


def test_every_export_takes_the_teachers_raw_inputs(tmp_path):
    """A preset standardises inside itself: the files it is exported to give the same outputs
    on raw inputs (features up to thousands) as the trained module."""
    import onnxruntime as ort

    from core.distill import export

    rng = np.random.default_rng(0)
    scales = np.repeat([10.0**k for k in range(-2, 4)], 5)  # 0.01 … 1000, five features each
    x = torch.from_numpy((rng.normal(size=(64, 30)) * scales + scales).astype(np.float32))
    student = build_student(
        StudentSpec(preset="mlp", width=16, depth=1),
        input_shape=x.shape[1:],
        input_dtype=x.dtype,
        output_dim=2,
        inputs=x,
    ).eval()
    first = next(iter(student.children()))
    assert type(first).__name__ == "Standardize"
    assert torch.allclose(first(x).std(0), torch.ones(30), atol=0.05)
    with torch.no_grad():
        expected = student(x)
    export.export_torchscript(student, x[:2], tmp_path / "s.pt")
    export.export_onnx(student, x[:2], tmp_path / "s.onnx", check_inputs=x)
    export.export_safetensors(student, tmp_path / "s.safetensors", example=x[:2])
    session = ort.InferenceSession(str(tmp_path / "s.onnx"))
    outputs = {
        "torchscript": torch.jit.load(str(tmp_path / "s.pt"))(x),
        "onnx": torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]),
        "safetensors": export.load_safetensors_student(tmp_path / "s.safetensors")(x),
    }
    for name, out in outputs.items():
        assert torch.allclose(out.detach(), expected, atol=1e-4), name


def _wine_job(folder: Path, **given: Any) -> tuple[dict[str, Any], list[str]]:
    data, teacher, fmt = wine(folder)
    np.savez(folder / "data.npz", x=data["x"], y=data["y"])
    body = {"teacher": {"path": str(teacher)}, "dataset_path": "data.npz", **given}
    events: list = []
    outcome = run_job(
        parse_spec(body),
        models={str(teacher): ModelFile(teacher, fmt)},
        dataset=folder / "data.npz",
        out_dir=folder / "out",
        work_dir=folder / "work",
        progress=events.append,
    )
    return outcome.result, [e.data["message"] for e in events if e.type == "log"]


def test_explicit_values_are_used_as_given_and_skip_the_search(tmp_path):
    pinned = {"epochs": 12, "batch_size": 20, "lr": 0.004, "warmup_epochs": 0.5}
    student = {"preset": "mlp", "width": 40, "depth": 1}
    result, logs = _wine_job(
        tmp_path, student=student, training={**pinned, "early_stopping_patience": 3}
    )
    ran = result["spec"]["training"]
    assert {k: ran[k] for k in pinned} == pinned and ran["early_stopping_patience"] == 3
    assert result["spec"]["student"] == {**result["spec"]["student"], **student}
    assert result["recipe"]["chosen"] == {} and "lr_trials" not in result["recipe"]
    assert not any("learning rate" in m for m in logs)


def test_auto_epochs_are_cut_to_fit_max_minutes(tmp_path):
    # 2.4 s: the lr trials fit, 143 epochs of the student and the baseline after them do not,
    # even on an idle machine.
    result, logs = _wine_job(tmp_path, training={"max_minutes": 0.04})
    chosen = result["recipe"]["chosen"]
    assert chosen["training.epochs"] < 143 and chosen["training.batch_size"] == 8
    assert any("to fit training.max_minutes" in m for m in logs)
    assert result["recipe"]["notes"]


def test_a_job_with_chosen_values_resumes_from_its_checkpoints(tmp_path):
    """Checkpoints hold plain numbers (torch.load(weights_only=True) refuses anything else):
    the same job run again over its work dir resumes instead of failing or starting over."""
    training = {"epochs": 15, "baseline": False}
    first, _ = _wine_job(tmp_path, training=training)
    again, logs = _wine_job(tmp_path, training=training)
    assert any(m.startswith("resumed from") for m in logs), logs
    assert again["student"]["accuracy"] == first["student"]["accuracy"]


def test_tune_reports_every_trial_and_delivers_the_best(tmp_path):
    data, teacher, fmt = wine(tmp_path)
    np.savez(tmp_path / "data.npz", x=data["x"], y=data["y"])
    body = {
        "teacher": {"path": str(teacher)},
        "dataset_path": "data.npz",
        "training": {"tune": {"trials": 4}, "epochs": 20, "baseline": False},
        "export": ["onnx"],
    }
    events: list = []
    outcome = run_job(
        parse_spec(body),
        models={str(teacher): ModelFile(teacher, fmt)},
        dataset=tmp_path / "data.npz",
        out_dir=tmp_path / "out",
        work_dir=tmp_path / "work",
        progress=events.append,
    )
    result = outcome.result
    tune = result["tune"]
    assert tune["metric"] == "val_accuracy" and len(tune["trials"]) == 4
    searched = {"lr", "weight_decay", "temperature", "alpha"}
    for trial in tune["trials"]:
        assert set(trial["params"]) == searched and trial["state"] in ("complete", "pruned")
    finished = [t for t in tune["trials"] if t["state"] == "complete"]
    assert tune["best"]["value"] == max(t["value"] for t in finished)
    # The delivered student is the best trial's: the same validation accuracy, and its values
    # are written into the completed spec as chosen ones.
    assert result["student"]["accuracy"] == pytest.approx(tune["best"]["value"])
    chosen = result["recipe"]["chosen"]
    for name, value in tune["best"]["params"].items():
        key = f"training.{name}" if name in ("lr", "weight_decay") else f"distillation.{name}"
        assert chosen[key] == pytest.approx(value, rel=1e-3), key
    logs = [e.data["message"] for e in events if e.type == "log"]
    assert sum(m.startswith("trial ") for m in logs) == 4


if __name__ == "__main__":  # figures for docs: python -m tests.core.test_recipe NAME…
    import sys
    import tempfile
    import time

    torch.set_num_threads(1)
    for task in sys.argv[1:] or [*TASKS, "signal-issue"]:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.monotonic()
            given = ISSUE_SETTINGS if task == "signal-issue" else {}
            job = measure(task.removesuffix("-issue"), Path(tmp), **given)
            r = job["result"]
            print(
                f"{task}: teacher {job['teacher_accuracy']:.3f} ({r['teacher']['parameters']} "
                f"params), student {job['student_accuracy']:.3f} ({r['student']['parameters']} "
                f"params), tutorial {job['tutorial_accuracy']:.3f}, "
                f"baseline val {r.get('baseline', {}).get('accuracy')}, "
                f"{time.monotonic() - t0:.1f} s; chosen {r['recipe']['chosen']}",
                flush=True,
            )
