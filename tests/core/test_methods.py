"""Distillation methods: each loss against a value computed by hand, and each one teaching."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from core.distill.methods import Batch, build_method, register_method
from core.distill.methods.kd import KD
from core.distill.students import build_student
from core.distill.teachers import ModuleTeacher
from core.distill.trainer import train
from core.distill.types import TransferSet
from core.errors import InvalidSpec
from core.spec import (
    AttentionMethod,
    DKDMethod,
    FitNetMethod,
    HintPair,
    KDMethod,
    ModelInfo,
    MSEMethod,
    RKDMethod,
    StudentSpec,
    TensorInfo,
    TrainingSpec,
)
from tests.conftest import accuracy

S = [[1.0, 2.0, 0.5], [0.2, -1.0, 3.0]]  # student logits
T = [[3.0, 0.0, 1.0], [0.0, 0.0, 2.0]]  # teacher logits


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only contend with the other tests
    yield
    torch.set_num_threads(threads)


def teacher_of(module: nn.Module, shape: list[int | None], out_dim: int) -> ModuleTeacher:
    info = ModelInfo(
        format="module",
        inputs=[TensorInfo(shape=shape, dtype="float32")],
        outputs=[TensorInfo(shape=[None, out_dim], dtype="float32")],
    )
    return ModuleTeacher(module, info)


@pytest.fixture
def tiny_teacher() -> ModuleTeacher:
    return teacher_of(nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)), [None, 4], 3)


def mlp(width: int = 4, depth: int = 1, shape: tuple[int, ...] = (4,), out: int = 3) -> nn.Module:
    spec = StudentSpec(preset="mlp", width=width, depth=depth)
    return build_student(spec, input_shape=list(shape), input_dtype="float32", output_dim=out)


# --- explicit formulas, in plain Python ---------------------------------------------------------


def softmax(row: list[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(v - top) for v in row]
    return [e / sum(exps) for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0)


def kd_by_hand(s: list[list[float]], t: list[list[float]], temp: float) -> float:
    rows = [
        kl(softmax([v / temp for v in tr]), softmax([v / temp for v in sr]))
        for sr, tr in zip(s, t, strict=True)
    ]
    return temp * temp * sum(rows) / len(rows)


def ce_by_hand(s: list[list[float]], y: list[int]) -> float:
    rows = [-math.log(softmax(sr)[yi]) for sr, yi in zip(s, y, strict=True) if yi >= 0]
    return sum(rows) / len(rows)


def smooth_l1(a: list[float], b: list[float]) -> float:
    d = [abs(x - y) for x, y in zip(a, b, strict=True)]
    return sum(0.5 * v * v if v < 1 else v - 0.5 for v in d) / len(d)


def call(method, y=None, feats=None, teacher_feats=None, epoch=0, s=S, t=T):
    out = torch.tensor(s, requires_grad=True)
    y = torch.tensor(y) if y is not None else None
    batch = Batch(out, y, torch.tensor(t), teacher_feats or {}, epoch)
    return method.compute(out, feats or {}, batch)


# --- hand-computed losses -----------------------------------------------------------------------


def test_kd_mixes_distillation_with_ce_on_labeled_samples_only(tiny_teacher):
    method = build_method(
        KDMethod(temperature=2.0, alpha=0.7),
        student=mlp(),
        teacher=tiny_teacher,
        task="classification",
        n_classes=3,
        epochs=1,
    )
    losses = call(method, y=[2, -1])
    expected = 0.7 * kd_by_hand(S, T, 2.0) + 0.3 * ce_by_hand(S[:1], [2])
    assert losses["loss"].item() == pytest.approx(expected, rel=1e-5)
    assert losses["ce"].item() == pytest.approx(-math.log(softmax(S[0])[2]), rel=1e-5)


def test_kd_without_labels_is_pure_distillation(tiny_teacher):
    method = build_method(
        KDMethod(temperature=3.0, alpha=0.5),
        student=mlp(),
        teacher=tiny_teacher,
        task="classification",
        n_classes=3,
        epochs=1,
    )
    for y in (None, [-1, -1]):
        losses = call(method, y=y)
        assert losses["loss"].item() == pytest.approx(kd_by_hand(S, T, 3.0), rel=1e-5)
        assert "ce" not in losses


def test_kd_accepts_teacher_log_probabilities(tiny_teacher):
    method = build_method(
        "kd", student=mlp(), teacher=tiny_teacher, task="classification", n_classes=3, epochs=1
    )
    log_probs = torch.log_softmax(torch.tensor(T), -1).tolist()
    assert call(method, t=log_probs)["loss"].item() == pytest.approx(
        call(method)["loss"].item(), rel=1e-5
    )


def test_mse_matches_outputs_and_mixes_in_labels(tiny_teacher):
    method = build_method(
        MSEMethod(alpha=0.25),
        student=mlp(),
        teacher=tiny_teacher,
        task="classification",
        n_classes=3,
        epochs=1,
    )
    flat = [(a - b) ** 2 for sr, tr in zip(S, T, strict=True) for a, b in zip(sr, tr, strict=True)]
    mse = sum(flat) / len(flat)
    losses = call(method, y=[1, 0])
    assert losses["loss"].item() == pytest.approx(0.25 * mse + 0.75 * ce_by_hand(S, [1, 0]))
    assert call(method)["loss"].item() == pytest.approx(mse)


def test_mse_regression_uses_mse_to_targets(tiny_teacher):
    method = build_method(
        MSEMethod(alpha=0.5), student=mlp(), teacher=tiny_teacher, task="regression",
        n_classes=None, epochs=1,
    )  # fmt: skip
    targets = [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
    out = torch.tensor(S)
    losses = method.compute(out, {}, Batch(out, torch.tensor(targets), torch.tensor(T)))
    to_teacher = (
        sum((a - b) ** 2 for r, q in zip(S, T, strict=True) for a, b in zip(r, q, strict=True)) / 6
    )
    to_targets = (
        sum(
            (a - b) ** 2 for r, q in zip(S, targets, strict=True) for a, b in zip(r, q, strict=True)
        )
        / 6
    )
    assert losses["loss"].item() == pytest.approx(0.5 * to_teacher + 0.5 * to_targets)


def test_dkd_decouples_target_and_non_target_terms(tiny_teacher):
    spec = DKDMethod(
        temperature=2.0, tckd_weight=1.0, nckd_weight=8.0, ce_weight=1.0, warmup_epochs=2
    )
    method = build_method(
        spec, student=mlp(), teacher=tiny_teacher, task="classification", n_classes=3, epochs=4
    )
    y = [0, -1]  # the unlabeled row takes the teacher's top class (2) as its target
    targets = [0, 2]
    tckd = nckd = 0.0
    for sr, tr, g in zip(S, T, targets, strict=True):
        p_s, p_t = softmax([v / 2 for v in sr]), softmax([v / 2 for v in tr])
        tckd += kl([p_t[g], 1 - p_t[g]], [p_s[g], 1 - p_s[g]])
        rest = [i for i in range(3) if i != g]
        nckd += kl(softmax([tr[i] / 2 for i in rest]), softmax([sr[i] / 2 for i in rest]))
    tckd, nckd = 4 * tckd / 2, 4 * nckd / 2
    ce = ce_by_hand(S[:1], [0])
    losses = call(method, y=y, epoch=0)  # warmup: half weight in the first of two epochs
    assert losses["tckd"].item() == pytest.approx(tckd, rel=1e-4)
    assert losses["nckd"].item() == pytest.approx(nckd, rel=1e-4)
    assert losses["loss"].item() == pytest.approx(ce + 0.5 * (tckd + 8 * nckd), rel=1e-4)
    assert call(method, y=y, epoch=3)["loss"].item() == pytest.approx(
        ce + tckd + 8 * nckd, rel=1e-4
    )


def test_fitnet_regresses_student_features_onto_teacher_hints(tiny_teacher):
    spec = FitNetMethod(
        temperature=2.0, alpha=0.9, hint_weight=0.5, hints=[HintPair(teacher="t", student="body")]
    )
    method = build_method(
        spec, student=mlp(), teacher=tiny_teacher, task="classification", n_classes=3, epochs=1
    )
    f_s = [[1.0, 2.0], [0.0, -1.0]]
    f_t = [[0.5, 0.0, 1.0], [2.0, 1.0, 0.0]]
    feats, t_feats = {"body": torch.tensor(f_s)}, {"t": torch.tensor(f_t)}
    call(method, feats=feats, teacher_feats=t_feats)  # creates the 2 → 3 projector
    w = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    with torch.no_grad():
        method.projectors["0"].weight.copy_(torch.tensor(w))
        method.projectors["0"].bias.fill_(0.5)
    proj = [[sum(wi * f for wi, f in zip(row, fs, strict=True)) + 0.5 for row in w] for fs in f_s]
    diffs = [
        (a - b) ** 2 for pr, tr in zip(proj, f_t, strict=True) for a, b in zip(pr, tr, strict=True)
    ]
    hint = sum(diffs) / len(diffs)
    losses = call(method, feats=feats, teacher_feats=t_feats)
    assert losses["hint"].item() == pytest.approx(hint)
    assert losses["loss"].item() == pytest.approx(kd_by_hand(S, T, 2.0) + 0.5 * hint, rel=1e-5)
    assert any(p is method.projectors["0"].weight for p in method.parameters())


def test_fitnet_uses_conv_projector_for_maps(tiny_teacher):
    student = build_student(
        StudentSpec(preset="cnn", width=2, depth=2), input_shape=[1, 8, 8],
        input_dtype="float32", output_dim=3,
    )  # fmt: skip
    spec = FitNetMethod(hints=[HintPair(teacher="t", student="blocks.1")])
    method = build_method(
        spec, student=student, teacher=tiny_teacher, task="classification", n_classes=3, epochs=1
    )
    x = torch.rand(2, 1, 8, 8)
    losses = method(Batch(x, None, torch.tensor(T), {"t": torch.rand(2, 5, 2, 2)}))
    assert isinstance(method.projectors["0"], nn.Conv2d)
    assert method.projectors["0"].out_channels == 5
    losses["loss"].backward()
    assert student.blocks[0][0].weight.grad is not None


def test_attention_transfer_compares_normalised_spatial_maps(tiny_teacher):
    student = build_student(
        StudentSpec(preset="cnn", width=2, depth=1), input_shape=[1, 2, 2],
        input_dtype="float32", output_dim=3,
    )  # fmt: skip
    spec = AttentionMethod(
        temperature=2.0,
        alpha=0.9,
        beta=10.0,
        p=2.0,
        hints=[HintPair(teacher="t", student="blocks.0")],
    )
    method = build_method(
        spec, student=student, teacher=tiny_teacher, task="classification", n_classes=3, epochs=1
    )
    f_s = [[[1.0, 2.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 3.0]]]  # (C=2, 2, 2)
    f_t = [[[0.0, 1.0], [2.0, 1.0]], [[1.0, 1.0], [0.0, 2.0]], [[1.0, 0.0], [0.0, 0.0]]]

    def att(f: list) -> list[float]:
        cells = [sum(ch[i][j] ** 2 for ch in f) / len(f) for i in range(2) for j in range(2)]
        norm = math.sqrt(sum(c * c for c in cells))
        return [c / norm for c in cells]

    a_s, a_t = att(f_s), att(f_t)
    at = sum((x - y) ** 2 for x, y in zip(a_s, a_t, strict=True)) / 4
    losses = call(
        method,
        feats={"blocks.0": torch.tensor([f_s, f_s])},
        teacher_feats={"t": torch.tensor([f_t, f_t])},
    )
    assert losses["attention"].item() == pytest.approx(at, rel=1e-5)
    assert losses["loss"].item() == pytest.approx(kd_by_hand(S, T, 2.0) + 5.0 * at, rel=1e-5)


def test_attention_needs_feature_maps(tiny_teacher):
    with pytest.raises(InvalidSpec, match="convolutional"):
        build_method(
            "attention", student=mlp(), teacher=tiny_teacher, task="classification",
            n_classes=3, epochs=1,
        )  # fmt: skip


def test_rkd_matches_distances_and_angles(tiny_teacher):
    spec = RKDMethod(temperature=2.0, alpha=0.9, distance_weight=25.0, angle_weight=50.0)
    method = build_method(
        spec, student=mlp(), teacher=tiny_teacher, task="classification", n_classes=3, epochs=1
    )
    pair = method.needs_features[0]
    assert pair == HintPair(teacher="2:input", student="body")  # the penultimate features
    e_s = [[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]
    e_t = [[1.0, 1.0], [2.0, 3.0], [0.0, 0.5]]

    def dist(e):
        d = [[math.dist(a, b) for b in e] for a in e]
        mean = sum(d[i][j] for i in range(3) for j in range(3) if i != j) / 6
        return [v / mean for row in d for v in row]

    def unit(v):
        n = math.hypot(*v)
        return [c / n for c in v] if n > 0 else [0.0 for _ in v]

    def angles(e):
        out = []
        for j in range(3):
            for i in range(3):
                for k in range(3):
                    u = unit([a - b for a, b in zip(e[i], e[j], strict=True)])
                    v = unit([a - b for a, b in zip(e[k], e[j], strict=True)])
                    out.append(sum(a * b for a, b in zip(u, v, strict=True)))
        return out

    distance = smooth_l1(dist(e_s), dist(e_t))
    angle = smooth_l1(angles(e_s), angles(e_t))
    s3, t3 = [*S, [0.0, 0.0, 0.0]], [*T, [1.0, 0.0, 0.0]]
    losses = call(
        method,
        s=s3,
        t=t3,
        feats={pair.student: torch.tensor(e_s)},
        teacher_feats={pair.teacher: torch.tensor(e_t)},
    )
    assert losses["distance"].item() == pytest.approx(distance, rel=1e-4)
    assert losses["angle"].item() == pytest.approx(angle, rel=1e-4)
    expected = kd_by_hand(s3, t3, 2.0) + 25 * distance + 50 * angle
    assert losses["loss"].item() == pytest.approx(expected, rel=1e-4)


def test_baseline_is_ce_on_labels_without_teacher():
    method = build_method(
        "baseline", student=mlp(), teacher=None, task="classification", n_classes=3, epochs=1
    )
    assert not method.needs_teacher
    out = torch.tensor(S)
    losses = method.compute(out, {}, Batch(out, torch.tensor([-1, 2])))
    assert losses["loss"].item() == pytest.approx(ce_by_hand(S[1:], [2]))


# --- the registry -------------------------------------------------------------------------------


def test_unknown_method_lists_the_known_ones(tiny_teacher):
    with pytest.raises(InvalidSpec) as err:
        build_method(
            "distil-magic", student=mlp(), teacher=tiny_teacher, task="classification",
            n_classes=3, epochs=1,
        )  # fmt: skip
    assert err.value.field == "distillation.method"
    for name in ("kd", "dkd", "fitnet", "attention", "rkd", "mse", "baseline"):
        assert name in err.value.message


def test_bad_knob_and_missing_teacher_are_invalid_specs(tiny_teacher):
    with pytest.raises(InvalidSpec, match="temperature"):
        build_method(
            {"method": "kd", "temperature": -1}, student=mlp(), teacher=tiny_teacher,
            task="classification", n_classes=3, epochs=1,
        )  # fmt: skip
    with pytest.raises(InvalidSpec, match="teacher"):
        build_method(
            "kd", student=mlp(), teacher=None, task="classification", n_classes=3, epochs=1
        )
    with pytest.raises(InvalidSpec, match="regression"):
        build_method(
            "kd", student=mlp(), teacher=tiny_teacher, task="regression", n_classes=None, epochs=1
        )


def test_unknown_hint_layer_names_the_field(tiny_teacher):
    spec = FitNetMethod(hints=[HintPair(teacher="t", student="nope.3")])
    with pytest.raises(InvalidSpec, match="no layer 'nope.3'") as err:
        build_method(
            spec, student=mlp(), teacher=tiny_teacher, task="classification", n_classes=3, epochs=1
        )
    assert err.value.field == "distillation.hints.0.student"


def test_registering_twice_warns():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        register_method("kd")(KD)
    assert any("registered twice" in str(w.message) for w in caught)


# --- each method teaches a student on digits -----------------------------------------------------


@pytest.mark.parametrize("name", ["kd", "mse", "dkd", "fitnet", "attention", "rkd", "baseline"])
def test_each_method_trains_far_above_chance(name, digits, digits_teacher):
    teacher = teacher_of(digits_teacher, [None, 1, 8, 8], 10)
    preset = "cnn" if name == "attention" else "mlp"
    torch.manual_seed(0)
    size = {"width": 16, "depth": 2} if preset == "cnn" else {"width": 64, "depth": 1}
    student = build_student(
        StudentSpec(preset=preset, **size), input_shape=[None, 1, 8, 8], input_dtype="float32",
        output_dim=10,
    )  # fmt: skip
    method = build_method(
        name, student=student, teacher=teacher, task="classification", n_classes=10, epochs=8
    )
    x, y = torch.from_numpy(digits["x_train"]), torch.from_numpy(digits["y_train"])
    data = TransferSet(x_train=x[:1100], y_train=y[:1100], x_val=x[1100:], y_val=y[1100:])
    result = train(
        student, method, data, teacher, TrainingSpec(epochs=8, batch_size=64, lr=1e-2),
        task="classification",
    )  # fmt: skip
    acc = accuracy(result.student, digits["x_test"], digits["y_test"])
    assert acc > 0.7, f"{name}: test accuracy {acc:.3f}"
    assert np.isfinite(result.history[-1]["train_loss"])


def test_causal_lm_methods_have_their_own_registry_entries():
    from core.distill.methods import build_token_method, method_names

    assert {"kd", "reverse_kl", "jsd", "gkd"} <= set(method_names(tokens=True))
    with pytest.raises(InvalidSpec, match="no per-token form") as err:
        build_token_method("dkd", student=mlp(), teacher=None)
    assert err.value.field == "distillation.method"
