"""What distillation is for, on digits: a CNN teacher taught to an MLP with 10x fewer parameters.

(a) With labels for 10% of the training inputs and the rest as an unlabeled transfer set, KD
    beats the same MLP trained on the labeled 10% alone by at least 3 points.
(b) Without any label, KD reaches at least 95% of the teacher's test accuracy.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from core.distill.methods import build_method
from core.distill.students import build_student, count_parameters
from core.distill.teachers import ModuleTeacher
from core.distill.trainer import train
from core.distill.types import TransferSet
from core.spec import ModelInfo, StudentSpec, TensorInfo, TrainingSpec
from tests.conftest import accuracy

STUDENT = StudentSpec(preset="mlp", width=100, depth=1)  # 7,510 parameters
KD_EPOCHS = 60
N_VAL = 126


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only contend with the other tests
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def split(digits):
    """The training split as a fixed validation part and a transfer set (seed 0)."""
    order = torch.from_numpy(np.random.default_rng(0).permutation(len(digits["x_train"])))
    x, y = torch.from_numpy(digits["x_train"])[order], torch.from_numpy(digits["y_train"])[order]
    return x[N_VAL:], y[N_VAL:], x[:N_VAL], y[:N_VAL]


def distil(method: str, data: TransferSet, teacher, epochs: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    student = build_student(STUDENT, input_shape=[1, 8, 8], input_dtype="float32", output_dim=10)
    m = build_method(
        method, student=student, teacher=teacher, task="classification", n_classes=10,
        epochs=epochs,
    )  # fmt: skip
    training = TrainingSpec(
        epochs=epochs, batch_size=64, lr=3e-3, seed=seed, early_stopping_patience=None
    )
    return train(student, m, data, teacher, training, task="classification").student


def teacher_of(module: nn.Module) -> ModuleTeacher:
    info = ModelInfo(
        format="module",
        inputs=[TensorInfo(shape=[None, 1, 8, 8], dtype="float32")],
        outputs=[TensorInfo(shape=[None, 10], dtype="float32")],
    )
    return ModuleTeacher(module, info)


def test_student_is_ten_times_smaller(digits_teacher):
    student = build_student(STUDENT, input_shape=[1, 8, 8], input_dtype="float32", output_dim=10)
    assert count_parameters(student) * 10 <= count_parameters(digits_teacher)


@pytest.mark.slow
def test_kd_with_few_labels_beats_training_on_the_labels_alone(digits, digits_teacher, split):
    x, y, x_val, y_val = split
    few = y.clone()
    n_labeled = len(y) // 10
    few[n_labeled:] = -1  # 10% labeled (the order is already shuffled), the rest unlabeled
    data = TransferSet(x_train=x, y_train=few, x_val=x_val, y_val=y_val)
    teacher = teacher_of(digits_teacher)
    # Same budget in optimizer steps: the baseline sees its few labels ten times as often.
    steps_per_epoch = len(x) // 64 + 1
    baseline_epochs = KD_EPOCHS * steps_per_epoch // (n_labeled // 64 + 1)
    kd_acc, base_acc = [], []
    for seed in (0, 1):
        kd = distil("kd", data, teacher, KD_EPOCHS, seed)
        base = distil("baseline", data, None, baseline_epochs, seed)
        kd_acc.append(accuracy(kd, digits["x_test"], digits["y_test"]))
        base_acc.append(accuracy(base, digits["x_test"], digits["y_test"]))
    print(f"10% labels: kd {kd_acc}, labels-only baseline {base_acc}")
    assert np.mean(kd_acc) >= np.mean(base_acc) + 0.03


@pytest.mark.slow
def test_label_free_kd_reaches_95_percent_of_the_teacher(digits, digits_teacher, split):
    x, _, x_val, _ = split
    data = TransferSet(x_train=x, y_train=None, x_val=x_val, y_val=None)
    student = distil("kd", data, teacher_of(digits_teacher), KD_EPOCHS, seed=0)
    teacher_acc = accuracy(digits_teacher, digits["x_test"], digits["y_test"])
    student_acc = accuracy(student, digits["x_test"], digits["y_test"])
    print(f"label-free: teacher {teacher_acc:.4f}, student {student_acc:.4f}")
    assert student_acc >= 0.95 * teacher_acc
