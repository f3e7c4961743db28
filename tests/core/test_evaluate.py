"""Metrics on hand-made tensors with hand-computed answers; predict, size, latency, compare."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from torch import nn

from core.distill.evaluate import (
    Timing,
    baseline_verdict,
    compare,
    interleaved_timing,
    latency_metrics,
    paired_speedup,
    predict,
    quality_metrics,
    size_metrics,
)
from core.errors import InvalidSpec

# argmax per row: 0, 1, 2, 2
OUTPUTS = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 2.0], [0.0, 1.0, 5.0]])


def test_label_metrics_ignore_unlabeled_rows() -> None:
    y = torch.tensor([0, 1, 1, -1])  # the last row is unlabeled; predictions 0, 1, 2 vs 0, 1, 1
    m = quality_metrics(OUTPUTS, task="classification", y=y)
    assert m["accuracy"] == pytest.approx(2 / 3)
    # class 0: P=1 R=1 F1=1; class 1: P=1 R=1/2 F1=2/3; class 2: P=0 R=0 F1=0
    assert m["precision_macro"] == pytest.approx((1 + 1 + 0) / 3)
    assert m["recall_macro"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert m["f1_macro"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert all(type(v) is float for v in m.values())


def test_no_labels_means_no_label_metrics() -> None:
    m = quality_metrics(OUTPUTS, task="classification", y=torch.full((4,), -1))
    assert m == {}


def test_agreement_and_kl_to_teacher() -> None:
    student = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    teacher = torch.tensor([[math.log(3.0), 0.0], [2.0, 1.0]])
    m = quality_metrics(student, task="classification", teacher_outputs=teacher)
    assert m["agreement"] == pytest.approx(0.5)  # row 0 agrees (class 0), row 1 does not

    def kl(p: list[float], q: list[float]) -> float:
        return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))

    a, b = math.exp(2) / (math.exp(2) + math.exp(1)), math.exp(1) / (math.exp(2) + math.exp(1))
    expected = (kl([0.75, 0.25], [0.5, 0.5]) + kl([a, b], [b, a])) / 2
    assert m["kl_to_teacher"] == pytest.approx(expected, rel=1e-5)


def test_kl_is_zero_for_the_teacher_itself_and_accepts_log_probabilities() -> None:
    logits = torch.randn(8, 5)
    same = quality_metrics(logits, task="classification", teacher_outputs=logits)
    assert same["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)
    assert same["agreement"] == 1.0
    student = torch.randn(8, 5)
    from_logits = quality_metrics(student, task="classification", teacher_outputs=logits)
    from_log_probs = quality_metrics(
        student, task="classification", teacher_outputs=torch.log_softmax(logits, -1)
    )
    assert from_log_probs["kl_to_teacher"] == pytest.approx(from_logits["kl_to_teacher"])


def test_regression_metrics() -> None:
    outputs = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    teacher = torch.tensor([[1.0, 0.0], [0.0, -2.0]])
    targets = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    m = quality_metrics(outputs, task="regression", y=targets, teacher_outputs=teacher)
    assert m["mse"] == pytest.approx(16 / 4)
    assert m["cosine"] == pytest.approx((1.0 + -1.0) / 2)
    assert m["mse_to_labels"] == pytest.approx(1 / 4)


def test_unknown_task_is_a_clear_error() -> None:
    with pytest.raises(InvalidSpec, match="classification"):
        quality_metrics(OUTPUTS, task="ranking")


class _Tuple(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.linear(x), x


class _FakeTeacher:
    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def test_predict_batches_every_kind_of_model(tmp_path) -> None:
    import onnxruntime as ort

    torch.manual_seed(0)
    model = _Tuple().eval()
    x = torch.randn(23, 4)
    with torch.no_grad():
        expected = model.linear(x)
    assert torch.allclose(predict(model, x, batch_size=5), expected)  # tuple output: first item
    assert torch.allclose(predict(_FakeTeacher(model.linear), x, batch_size=7), expected)
    assert torch.allclose(predict(lambda t: model.linear(t), x), expected)
    scripted = torch.jit.script(model.linear)
    assert torch.allclose(predict(scripted, x, batch_size=4), expected)
    path = tmp_path / "m.onnx"
    torch.onnx.export(
        model.linear, (x[:1],), str(path), dynamo=False, dynamic_axes={"input": {0: "n"}},
        input_names=["input"],
    )  # fmt: skip
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert torch.allclose(predict(session, x, batch_size=10), expected, atol=1e-6)


def test_size_metrics_count_parameters_and_serialized_bytes() -> None:
    m = size_metrics(nn.Sequential(nn.Linear(100, 50), nn.ReLU(), nn.Linear(50, 10)))
    assert m["parameters"] == 100 * 50 + 50 + 50 * 10 + 10
    # float32 weights plus a little framing
    assert 4 * m["parameters"] < m["size_bytes"] < 4 * m["parameters"] + 4096


def test_latency_is_time_bounded_and_measures_throughput_at_the_batch() -> None:
    def slow(x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.01)  # 10 ms a call, whatever the batch size
        return x

    start = time.perf_counter()
    m = latency_metrics(slow, torch.zeros(64, 3), warmup=1, iters=10_000, max_seconds=0.3)
    assert time.perf_counter() - start < 2.0
    assert 10.0 <= m["latency_ms_p50"] <= m["latency_ms_p95"] < 100.0
    assert 64 / 0.1 < m["throughput_per_s"] <= 64 / 0.01  # 64 inputs per ≥10 ms call


def test_latency_of_a_module() -> None:
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    m = latency_metrics(model, torch.randn(300, 32), iters=50, max_seconds=0.5)
    assert set(m) == {"latency_ms_p50", "latency_ms_p95", "throughput_per_s"}
    assert 0 < m["latency_ms_p50"] <= m["latency_ms_p95"]
    assert m["throughput_per_s"] > 0


def test_compare_reports_parameter_and_size_ratios_teacher_over_student() -> None:
    teacher = {"parameters": 1_200_000, "size_bytes": 4_800_000, "latency_ms_p50": 3.1}
    student = {"parameters": 60_000, "size_bytes": 600_000, "latency_ms_p50": 0.2}
    assert compare(teacher, student) == {
        "parameter_ratio": 20.0,
        "size_ratio": 8.0,
        "compression_ratio": 20.0,  # API.md's name, defined as the parameter ratio
        "speedup": 15.5,
    }
    # A student 76× larger than its teacher: a small ratio that stays readable, never 0.0.
    larger = compare({"parameters": 1000}, {"parameters": 76_000})
    assert (
        larger["parameter_ratio"] == pytest.approx(1 / 76, rel=1e-3) and larger["speedup"] is None
    )
    assert compare(teacher, {"size_bytes": 0}) == {
        "parameter_ratio": None,
        "size_ratio": None,
        "compression_ratio": None,
        "speedup": None,
    }


def _logits(pred: list[int], k: int = 3) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(pred), k).float()


def test_verdict_is_mcnemar_on_the_samples_where_only_one_model_is_right() -> None:
    y = torch.tensor([0, 1, 2] * 20)  # 60 labelled samples
    baseline = _logits(y.tolist())  # always right
    wrong = (y + 1) % 3
    student_pred = y.clone()
    student_pred[:12] = wrong[:12]  # the student misses 12 the baseline gets
    result = baseline_verdict(_logits(student_pred.tolist()), baseline, y, task="classification")
    assert result is not None
    assert result["verdict"] == "baseline_better"
    assert (result["student_only_correct"], result["baseline_only_correct"]) == (0, 12)
    assert result["test"] == "mcnemar_exact" and result["n"] == 60
    assert result["p_value"] == pytest.approx(2 * 0.5**12)  # exact two-sided binomial
    assert result["difference"] == pytest.approx(-0.2)
    low, high = result["difference_ci95"]
    assert low < -0.2 < high < 0

    # Swapped, the same evidence favours distillation.
    swapped = baseline_verdict(baseline, _logits(student_pred.tolist()), y, task="classification")
    assert swapped is not None and swapped["verdict"] == "distillation_helped"


def test_verdict_sees_noise_where_accuracy_differs_by_a_few_samples() -> None:
    y = torch.tensor([0, 1, 2] * 20)
    wrong = ((y + 1) % 3).tolist()
    student = y.tolist()
    baseline = y.tolist()
    student[:5] = wrong[:5]  # student misses 5, baseline misses 3 others: 2 samples apart
    baseline[10:13] = wrong[10:13]
    result = baseline_verdict(_logits(student), _logits(baseline), y, task="classification")
    assert result is not None and result["verdict"] == "no_significant_difference"
    assert result["student"] < result["baseline"] and result["p_value"] > 0.05


def test_verdict_ignores_unlabelled_rows_and_needs_labels() -> None:
    y = torch.tensor([0, -1, 1, -1])
    student = _logits([0, 1, 1, 0])
    baseline = _logits([0, 0, 1, 1])
    result = baseline_verdict(student, baseline, y, task="classification")
    assert result is not None and result["n"] == 2 and result["p_value"] == 1.0
    assert result["verdict"] == "no_significant_difference"
    assert baseline_verdict(student, baseline, None, task="classification") is None
    assert baseline_verdict(student, baseline, torch.full((4,), -1), task="classification") is None


def test_verdict_for_regression_is_a_signed_rank_test_on_squared_errors() -> None:
    torch.manual_seed(0)
    y = torch.randn(80, 2)
    close = y + 0.05 * torch.randn(80, 2)
    far = y + 0.5 * torch.randn(80, 2)
    result = baseline_verdict(close, far, y, task="regression")
    assert result is not None and result["test"] == "wilcoxon_signed_rank"
    assert result["verdict"] == "distillation_helped" and result["metric"] == "mse_to_labels"
    assert result["student"] < result["baseline"]
    flipped = baseline_verdict(far, close, y, task="regression")
    assert flipped is not None and flipped["verdict"] == "baseline_better"
    same = baseline_verdict(close, close, y, task="regression")
    assert same is not None and same["verdict"] == "no_significant_difference"


def test_interleaved_timing_alternates_rounds_and_reports_median_and_spread() -> None:
    order: list[str] = []

    def recorder(name: str, seconds: float):
        def run(x: torch.Tensor) -> torch.Tensor:
            if len(x) == 1:
                order.append(name)
            time.sleep(seconds)
            return x

        return run

    models = {"teacher": recorder("teacher", 0.002), "student": recorder("student", 0.0)}
    timings = interleaved_timing(
        models, torch.zeros(16, 3), rounds=4, calls=3, batch_calls=3, warmup=1, max_seconds=10
    )
    assert set(timings) == {"teacher", "student"}
    for timing in timings.values():
        assert len(timing.calls) == 4 and all(len(c) == 3 for c in timing.calls)
        assert len(timing.throughput) == 4
    # After one warm-up call each, rounds alternate and rotate who goes first.
    timed = order[2:]
    blocks = [timed[i] for i in range(0, len(timed), 3)]
    assert blocks == ["teacher", "student", "student", "teacher"] * 2
    m = timings["teacher"].metrics()
    low, high = m["latency_ms_range"]
    assert 2.0 <= low <= m["latency_ms_p50"] <= high <= m["latency_ms_p95"] + 1e-9
    assert isinstance(m["latency_noisy"], bool)
    assert m["throughput_range"][0] <= m["throughput_per_s"] <= m["throughput_range"][1]


def test_noisy_flag_and_paired_speedup_come_from_the_rounds() -> None:
    steady = Timing(calls=[[0.010] * 3] * 5, throughput=[100.0] * 5)
    assert steady.metrics()["latency_noisy"] is False
    jumpy = Timing(calls=[[0.010] * 3, [0.030] * 3, [0.010] * 3], throughput=[100.0] * 3)
    assert jumpy.metrics()["latency_noisy"] is True
    assert jumpy.metrics()["latency_ms_range"] == pytest.approx([10.0, 30.0])
    # A slow spell that hits both models in the same round leaves their ratio alone.
    teacher = Timing(calls=[[0.010] * 3, [0.030] * 3, [0.010] * 3], throughput=[1.0] * 3)
    student = Timing(calls=[[0.001] * 3, [0.003] * 3, [0.001] * 3], throughput=[1.0] * 3)
    speed = paired_speedup(teacher, student)
    assert speed["speedup"] == pytest.approx(10.0)
    assert speed["speedup_range"] == pytest.approx([10.0, 10.0])
    assert speed["speedup_noisy"] is False


def test_predict_rejects_empty_input() -> None:
    with pytest.raises(ValueError, match="empty"):
        predict(nn.Linear(2, 2), torch.zeros(0, 2))


def test_predict_returns_float_cpu_tensor() -> None:
    model = nn.Linear(3, 2).half()
    out = predict(lambda x: model(x.half()), torch.ones(4, 3))
    assert out.dtype == torch.float32 and out.device.type == "cpu"
    assert np.isfinite(out.numpy()).all()


def test_interleaved_timing_runs_on_one_thread_and_restores_the_count() -> None:
    seen: set[int] = set()

    def run(x: torch.Tensor) -> torch.Tensor:
        seen.add(torch.get_num_threads())
        return x

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        interleaved_timing({"m": run}, torch.zeros(4, 2), rounds=2, calls=3, warmup=1)
        assert seen == {1}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
