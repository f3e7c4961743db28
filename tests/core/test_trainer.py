"""The training loop: resume, determinism, the teacher cache, failures and events."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import core.distill.trainer as trainer_module
from core.distill.methods import build_method
from core.distill.students import build_student
from core.distill.teachers import ModuleTeacher
from core.distill.trainer import train
from core.distill.types import Event, TransferSet
from core.errors import Cancelled, InvalidSpec, JobTimeout, TrainingDiverged
from core.spec import FitNetMethod, ModelInfo, StudentSpec, TensorInfo, TrainingSpec


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only contend with the other tests
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def teacher(digits_teacher: nn.Module) -> ModuleTeacher:
    info = ModelInfo(
        format="module",
        inputs=[TensorInfo(shape=[None, 1, 8, 8], dtype="float32")],
        outputs=[TensorInfo(shape=[None, 10], dtype="float32")],
    )
    return ModuleTeacher(digits_teacher, info)


@pytest.fixture
def data(digits) -> TransferSet:
    x, y = torch.from_numpy(digits["x_train"]), torch.from_numpy(digits["y_train"])
    return TransferSet(x_train=x[:600], y_train=y[:600], x_val=x[600:800], y_val=y[600:800])


def setup(teacher, method="kd", seed=0, dropout=0.2):
    torch.manual_seed(seed)
    student = build_student(
        StudentSpec(preset="mlp", width=32, depth=2, dropout=dropout),
        input_shape=[None, 1, 8, 8],
        input_dtype="float32",
        output_dim=10,
    )
    m = build_method(
        method, student=student, teacher=teacher, task="classification", n_classes=10, epochs=4
    )
    return student, m


def spec(**kw) -> TrainingSpec:
    return TrainingSpec(**{"epochs": 4, "batch_size": 64, "lr": 5e-3, **kw})


def weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["kd", FitNetMethod()])
def test_resume_after_interruption_gives_the_same_weights(method, teacher, data, tmp_path):
    student, m = setup(teacher, method)
    full = train(student, m, data, teacher, spec(), task="classification")
    expected = weights(full.student)

    steps = {"n": 0}

    def stop_in_epoch_3() -> bool:
        steps["n"] += 1
        return steps["n"] > 2 * 10 + 4  # 10 steps per epoch: two epochs and a bit

    student, m = setup(teacher, method)
    with pytest.raises(Cancelled):
        train(
            student, m, data, teacher, spec(), task="classification",
            should_stop=stop_in_epoch_3, checkpoint_dir=tmp_path, label="stage 1/1",
        )  # fmt: skip
    saved = torch.load(tmp_path / "stage_1_1-stage1.pt", weights_only=True)
    assert saved["epoch"] == 2

    student, m = setup(teacher, method, seed=99)  # different initial weights: all restored
    logs: list[Event] = []
    resumed = train(
        student, m, data, teacher, spec(), task="classification",
        checkpoint_dir=tmp_path, label="stage 1/1", progress=logs.append,
    )  # fmt: skip
    assert same(weights(resumed.student), expected)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3, 4]
    assert resumed.history[-1]["val_loss"] == full.history[-1]["val_loss"]
    assert any("resumed" in e.data.get("message", "") for e in logs if e.type == "log")


def test_checkpoint_of_another_run_is_ignored(teacher, data, tmp_path):
    student, m = setup(teacher)
    train(student, m, data, teacher, spec(epochs=1), task="classification", checkpoint_dir=tmp_path)
    student, m = setup(teacher)
    result = train(
        student, m, data, teacher, spec(epochs=2, lr=1e-3), task="classification",
        checkpoint_dir=tmp_path,
    )  # fmt: skip
    assert result.epochs_run == 2  # started over: the spec differs


def test_same_seed_same_weights_other_seed_other_weights(teacher, data):
    runs = []
    for seed in (0, 0, 1):
        student, m = setup(teacher, seed=0)
        train(student, m, data, teacher, spec(epochs=2, seed=seed), task="classification")
        runs.append(weights(student))
    assert same(runs[0], runs[1])
    assert not same(runs[0], runs[2])


def test_teacher_cache_on_off_and_on_disk_agree(teacher, data, tmp_path, monkeypatch):
    results = []
    for cache in (True, False):
        student, m = setup(teacher, "fitnet", dropout=0.0)
        train(
            student, m, data, teacher, spec(epochs=2, cache_teacher_outputs=cache),
            task="classification",
        )  # fmt: skip
        results.append(weights(student))
    monkeypatch.setattr(trainer_module, "CACHE_MEMORY_LIMIT", 0)  # spill to memory-mapped files
    student, m = setup(teacher, "fitnet", dropout=0.0)
    train(student, m, data, teacher, spec(epochs=2), task="classification", checkpoint_dir=tmp_path)
    results.append(weights(student))
    for other in results[1:]:
        assert same(other, results[0])
    assert not list(tmp_path.glob("teacher-cache-*"))  # spill files removed


def test_cache_runs_the_teacher_once(teacher, data):
    calls = {"n": 0}
    predict = teacher.predict

    def counting(x):
        calls["n"] += 1
        return predict(x)

    teacher.predict = counting  # type: ignore[method-assign]
    student, m = setup(teacher)
    train(student, m, data, teacher, spec(epochs=3), task="classification")
    assert calls["n"] == 2  # x_train once, x_val once
    calls["n"] = 0
    student, m = setup(teacher)
    train(
        student, m, data, teacher, spec(epochs=3, cache_teacher_outputs=False),
        task="classification",
    )  # fmt: skip
    assert calls["n"] == 1 + 1 + 3 * 10  # x_val, the sizing batch, then every training step


def test_nan_loss_is_training_diverged(teacher, data):
    student, m = setup(teacher)
    with torch.no_grad():
        student.head.weight.fill_(float("nan"))
    with pytest.raises(TrainingDiverged) as err:
        train(student, m, data, teacher, spec(), task="classification")
    assert err.value.code == "training_diverged"
    assert "epoch 1, step 1" in err.value.message and "lr" in err.value.message


@pytest.mark.parametrize("check_steps", [3, 50])  # checked within the epoch, or at its end
def test_divergence_mid_run_names_its_step_and_is_not_checkpointed(
    teacher, data, tmp_path, monkeypatch, check_steps
):
    monkeypatch.setattr(trainer_module, "DIVERGENCE_CHECK_STEPS", check_steps)
    student, m = setup(teacher)
    compute, calls = m.compute, {"n": 0}

    def poisoned(*args):
        losses = compute(*args)
        calls["n"] += 1
        if calls["n"] == 1 + 10 + 1 + 7:  # sizing forward, epoch 1, its validation, 7 steps
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    m.compute = poisoned  # type: ignore[method-assign]
    with pytest.raises(TrainingDiverged) as err:
        train(student, m, data, teacher, spec(), task="classification", checkpoint_dir=tmp_path)
    assert err.value.details == {"epoch": 2, "step": 7}
    assert "epoch 2, step 7" in err.value.message
    assert torch.load(tmp_path / "student-stage1.pt", weights_only=True)["epoch"] == 1


def test_should_stop_cancels_and_timeout_stops(teacher, data):
    student, m = setup(teacher)
    with pytest.raises(Cancelled) as err:
        train(student, m, data, teacher, spec(), task="classification", should_stop=lambda: True)
    assert err.value.code == "cancelled"
    student, m = setup(teacher)
    with pytest.raises(JobTimeout, match="max_minutes"):
        train(student, m, data, teacher, spec(max_minutes=1e-6), task="classification")


def test_early_stopping_keeps_the_best_weights(teacher, data):
    student, m = setup(teacher, dropout=0.0)
    # A learning rate this small leaves the accuracy where the first epoch put it.
    result = train(
        student, m, data, teacher, spec(epochs=20, lr=1e-9, early_stopping_patience=2),
        task="classification",
    )  # fmt: skip
    assert result.stopped_early and result.epochs_run == 3 and result.best_epoch == 1
    assert result.metric == "val_accuracy"

    student, m = setup(teacher, dropout=0.0)
    result = train(student, m, data, teacher, spec(epochs=6, lr=2e-2), task="classification")
    with torch.no_grad():
        pred = result.student(data.x_val).argmax(1)
    best = result.history[result.best_epoch - 1]["val_accuracy"]
    assert result.best_metric == best == max(r["val_accuracy"] for r in result.history)
    assert (pred == data.y_val).float().mean().item() == pytest.approx(best)


def test_val_metric_without_labels_is_agreement(teacher, data):
    unlabeled = TransferSet(x_train=data.x_train, y_train=None, x_val=data.x_val, y_val=None)
    student, m = setup(teacher)
    result = train(student, m, unlabeled, teacher, spec(epochs=4, lr=2e-2), task="classification")
    assert result.metric == "val_agreement"
    assert "val_accuracy" not in result.history[-1]
    with torch.no_grad():
        agree = result.student(data.x_val).argmax(1) == teacher.predict(data.x_val).argmax(1)
    assert agree.float().mean().item() == pytest.approx(result.best_metric)
    assert result.best_metric == max(r["val_agreement"] for r in result.history) > 0.3


def test_progress_and_metrics_events(teacher, data, monkeypatch):
    monkeypatch.setattr(trainer_module, "PROGRESS_INTERVAL", 0.0)
    events: list[Event] = []
    student, m = setup(teacher)
    result = train(
        student, m, data, teacher, spec(epochs=2), task="classification", stage=2, stages=3,
        progress=events.append,
    )  # fmt: skip
    progress = [e.data for e in events if e.type == "progress"]
    metrics = [e.data for e in events if e.type == "metrics"]
    assert len(progress) == 20 and progress[-1]["fraction"] == 1.0
    assert [p["step"] for p in progress] == list(range(1, 21))
    assert all(p["stage"] == 2 and p["stages"] == 3 and p["steps"] == 20 for p in progress)
    assert progress[-1]["eta_seconds"] == 0
    assert metrics == result.history
    assert [m["step"] for m in metrics] == [10, 20]  # optimizer steps at each epoch's end
    row = metrics[0]
    for key in ("train_loss", "train_kd", "train_ce", "val_loss", "val_accuracy", "lr", "seconds"):
        assert key in row
    assert metrics[0]["lr"] > 0 and metrics[-1]["lr"] == pytest.approx(0.0, abs=1e-9)


def test_baseline_trains_on_labeled_rows_only(teacher, data):
    y = data.y_train.clone()
    y[60:] = -1
    few = TransferSet(x_train=data.x_train, y_train=y, x_val=data.x_val, y_val=data.y_val)
    events: list[Event] = []
    student, m = setup(teacher, "baseline")
    train(student, m, few, None, spec(epochs=1), task="classification", progress=events.append)
    steps = [e.data["steps"] for e in events if e.type == "progress"]
    assert steps and steps[0] == 1  # 60 labeled rows in one batch of 64
    with pytest.raises(InvalidSpec, match="labeled"):
        unlabeled = TransferSet(x_train=data.x_train, y_train=None, x_val=data.x_val, y_val=None)
        student, m = setup(teacher, "baseline")
        train(student, m, unlabeled, None, spec(epochs=1), task="classification")


def test_bf16_on_cpu_trains_and_bad_precision_or_device_is_invalid(teacher, data):
    student, m = setup(teacher, "baseline")  # precision is the same for every method
    result = train(
        student, m, data, teacher, spec(epochs=3, lr=1e-2, precision="bf16"), task="classification"
    )
    assert result.history[-1]["val_accuracy"] > 0.5
    with pytest.raises(InvalidSpec, match="fp16"):
        train(
            student, m, data, teacher, spec(precision="fp16", device="cpu"), task="classification"
        )
    if not torch.cuda.is_available():
        with pytest.raises(InvalidSpec) as err:
            train(student, m, data, teacher, spec(device="cuda:0"), task="classification")
        assert err.value.field == "training.device"


def test_sgd_and_warmup(teacher, data):
    student, m = setup(teacher, "baseline")
    events: list[Event] = []
    result = train(
        student, m, data, teacher, spec(epochs=4, optimizer="sgd", lr=0.2, warmup_epochs=1),
        task="classification", progress=events.append,
    )  # fmt: skip
    assert result.history[0]["lr"] == pytest.approx(0.2)  # warmup ends with epoch 1
    assert result.history[-1]["val_accuracy"] > 0.5


def test_regression_with_mse(data):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 3))
    info = ModelInfo(
        format="module",
        inputs=[TensorInfo(shape=[None, 1, 8, 8], dtype="float32")],
        outputs=[TensorInfo(shape=[None, 3], dtype="float32")],
    )
    teacher = ModuleTeacher(net, info)
    regression = TransferSet(x_train=data.x_train, y_train=None, x_val=data.x_val, y_val=None)
    student = build_student(
        StudentSpec(preset="mlp", width=32, depth=1), input_shape=[1, 8, 8],
        input_dtype="float32", output_dim=3,
    )  # fmt: skip
    m = build_method(
        "mse", student=student, teacher=teacher, task="regression", n_classes=None, epochs=6
    )
    result = train(student, m, regression, teacher, spec(epochs=6, lr=1e-2), task="regression")
    mses = [r["val_mse"] for r in result.history]
    assert result.metric == "val_loss"
    assert mses[-1] < mses[0] / 2


def test_checkpoint_holds_only_tensors_and_primitives(teacher, data, tmp_path: Path):
    student, m = setup(teacher, FitNetMethod())
    train(student, m, data, teacher, spec(epochs=1), task="classification", checkpoint_dir=tmp_path)
    state = torch.load(tmp_path / "student-stage1.pt", weights_only=True)
    assert state["finished"] and state["epoch"] == 1
    assert set(state["method"]) == {"projectors.0.weight", "projectors.0.bias"}
    assert '"method": "fitnet"' in state["spec"]
