"""Measure a model, teacher or student alike: quality, size and speed, and compare two of them.

Every function returns plain Python floats and ints, ready for a job's ``result``.
"""

from __future__ import annotations

import io
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from core.errors import InvalidSpec

Runner = Callable[[torch.Tensor], torch.Tensor]


def output_tensor(out: Any) -> torch.Tensor:
    """The main output of a model that may return a tuple, a list or a dict."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, np.ndarray):
        return torch.from_numpy(out)
    if isinstance(out, (tuple, list)) and out:
        return output_tensor(out[0])
    if isinstance(out, dict) and out:
        return output_tensor(out["logits"] if "logits" in out else next(iter(out.values())))
    raise TypeError(f"the model returned {type(out).__name__}, not a tensor")


def _onnx_runner(session: Any) -> Runner:
    """Run an onnxruntime session (or a wrapper exposing ``run``/``get_inputs``) on tensors."""
    first = session.get_inputs()[0]
    np_dtype = np.float16 if first.type == "tensor(float16)" else None

    def run(x: torch.Tensor) -> torch.Tensor:
        array = x.detach().cpu().numpy()
        if np_dtype is not None:
            array = array.astype(np_dtype)
        return torch.from_numpy(np.asarray(session.run(None, {first.name: array})[0]))

    return run


def _runner(model_or_fn: Any, device: torch.device) -> Runner:
    """One callable ``x -> outputs`` for every kind of model this engine handles."""
    if isinstance(model_or_fn, nn.Module):
        return lambda x: output_tensor(model_or_fn(x.to(device)))
    predict_fn = getattr(model_or_fn, "predict", None)
    if callable(predict_fn):  # a Teacher
        return lambda x: output_tensor(predict_fn(x.to(device)))
    if hasattr(model_or_fn, "get_inputs") and hasattr(model_or_fn, "run"):
        return _onnx_runner(model_or_fn)
    if callable(model_or_fn):
        return lambda x: output_tensor(model_or_fn(x.to(device)))
    raise TypeError(f"cannot run a {type(model_or_fn).__name__}: give a module or a callable")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def predict(
    model_or_fn: Any,
    x: torch.Tensor,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Outputs of a model on ``x`` in batches, as one float CPU tensor.

    Accepts an ``nn.Module`` (eager or TorchScript), an onnxruntime ``InferenceSession``, a
    Teacher (through its ``predict``) or any callable ``x -> outputs``. Batches are moved to
    ``device``; the model must already be there.
    """
    device = torch.device(device)
    run = _runner(model_or_fn, device)
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            out = run(x[start : start + batch_size]).detach().cpu()
            outputs.append(out.float() if out.is_floating_point() else out)
    if not outputs:
        raise ValueError("predict got no inputs (an empty tensor)")
    return torch.cat(outputs)


def quality_metrics(
    outputs: torch.Tensor,
    *,
    task: str,
    y: torch.Tensor | None = None,
    teacher_outputs: torch.Tensor | None = None,
) -> dict[str, float]:
    """Quality of ``outputs`` against labels and/or the teacher's outputs.

    classification: ``accuracy``, ``f1_macro``, ``precision_macro``, ``recall_macro`` on rows
    whose label is not -1; with teacher outputs ``agreement`` (share of equal argmax) and
    ``kl_to_teacher`` (mean KL(teacher || model) at temperature 1).
    regression: ``mse`` and ``cosine`` (mean per-row cosine similarity) to the teacher, and
    ``mse_to_labels`` when ``y`` holds float targets.
    """
    outputs = outputs.detach().float().cpu()
    metrics: dict[str, float] = {}
    if task == "classification":
        if y is not None and not y.is_floating_point():
            metrics.update(_label_metrics(outputs, y.cpu()))
        if teacher_outputs is not None:
            teacher = teacher_outputs.detach().float().cpu()
            metrics["agreement"] = float((outputs.argmax(-1) == teacher.argmax(-1)).float().mean())
            log_p_t = torch.log_softmax(teacher, dim=-1)
            log_p_s = torch.log_softmax(outputs, dim=-1)
            kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean()
            metrics["kl_to_teacher"] = float(kl)
    elif task == "regression":
        flat = outputs.reshape(len(outputs), -1)
        if teacher_outputs is not None:
            teacher = teacher_outputs.detach().float().cpu().reshape(len(outputs), -1)
            metrics["mse"] = float(((flat - teacher) ** 2).mean())
            metrics["cosine"] = float(torch.cosine_similarity(flat, teacher, dim=1).mean())
        if y is not None and y.is_floating_point():
            targets = y.detach().float().cpu().reshape(len(outputs), -1)
            metrics["mse_to_labels"] = float(((flat - targets) ** 2).mean())
    else:
        raise InvalidSpec(
            f"unknown task '{task}'; use 'classification' or 'regression'", field="task"
        )
    return metrics


def _label_metrics(outputs: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    keep = y >= 0  # -1 marks an unlabeled row
    if not bool(keep.any()):
        return {}
    y_true = y[keep].numpy()
    y_pred = outputs[keep].argmax(-1).numpy()
    precision, recall, f1, _ = precision_recall_fscore_support(
        y_true, y_pred, average="macro", zero_division=0
    )
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "f1_macro": float(f1),
        "precision_macro": float(precision),
        "recall_macro": float(recall),
    }


def count_parameters(module: nn.Module) -> int:
    """Parameters of a module, counting the packed weights of quantized layers too."""
    from torch.ao.nn.quantized.modules.utils import WeightedQuantizedModule

    total = sum(p.numel() for p in module.parameters())
    for sub in module.modules():
        # Quantized layers keep weight and bias in packed params, not in nn.Parameters.
        if isinstance(sub, WeightedQuantizedModule) and callable(
            getattr(sub, "_weight_bias", None)
        ):
            weight, bias = sub._weight_bias()
            total += weight.numel() + (bias.numel() if bias is not None else 0)
    return int(total)


def serialized_size(module: nn.Module) -> int:
    """Bytes of the module's state dict saved with ``torch.save`` (works for quantized ones)."""
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def size_metrics(module: nn.Module) -> dict[str, int]:
    """``parameters`` and ``size_bytes`` (serialized state dict) of a module we built or trained.

    For a file-backed teacher, report the uploaded file's size instead.
    """
    return {"parameters": count_parameters(module), "size_bytes": serialized_size(module)}


def _timed_runs(
    run: Runner, x: torch.Tensor, device: torch.device, iters: int, max_seconds: float
) -> list[float]:
    """Seconds per call, for up to ``iters`` calls or ``max_seconds`` (at least 3 calls)."""
    times: list[float] = []
    deadline = time.perf_counter() + max_seconds
    while len(times) < iters and (len(times) < 3 or time.perf_counter() < deadline):
        start = time.perf_counter()
        run(x)
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def latency_metrics(
    fn: Any,
    example: torch.Tensor,
    *,
    device: torch.device | str = "cpu",
    warmup: int = 10,
    iters: int = 200,
    max_seconds: float = 1.0,
    batch_size: int = 256,
) -> dict[str, float]:
    """Latency at batch 1 (``latency_ms_p50``, ``latency_ms_p95``) and ``throughput_per_s``.

    Throughput is measured at ``batch_size`` inputs per call, or all of ``example`` when it is
    smaller. Each measurement stops after ``iters`` calls or ``max_seconds`` (whichever comes
    first, at least 3 calls). Runs under ``torch.inference_mode`` with torch's current thread
    count (``torch.get_num_threads()``; the caller sets it, so teacher and student are measured
    alike), synchronising CUDA after every call on a GPU.
    """
    device = torch.device(device)
    run = _runner(fn, device)
    single = example[:1].to(device)
    batch = example[:batch_size].to(device)
    with torch.inference_mode():
        for _ in range(warmup):
            run(single)
        run(batch)
        _sync(device)
        one = _timed_runs(run, single, device, iters, max_seconds)
        many = _timed_runs(run, batch, device, max(iters // 10, 3), max_seconds)
    one_ms = sorted(t * 1000.0 for t in one)
    per_batch = statistics.median(many)
    return {
        "latency_ms_p50": float(statistics.median(one_ms)),
        "latency_ms_p95": float(one_ms[min(len(one_ms) - 1, math.ceil(0.95 * len(one_ms)) - 1)]),
        "throughput_per_s": float(len(batch) / per_batch) if per_batch > 0 else 0.0,
    }


def _ratio(numerator: Any, denominator: Any) -> float | None:
    """numerator / denominator to 4 significant digits, or None when either is missing or not
    positive (a ratio far below 1 stays readable: 0.01316, never 0.0)."""
    if not isinstance(numerator, (int, float)) or not isinstance(denominator, (int, float)):
        return None
    if numerator <= 0 or denominator <= 0:
        return None
    return float(f"{float(numerator) / float(denominator):.4g}")


def compare(teacher_metrics: dict[str, Any], student_metrics: dict[str, Any]) -> dict[str, Any]:
    """How the student compares with the teacher, each ratio teacher / student (above 1: the
    student is smaller or faster; below 1: larger or slower); ``None`` where a value is missing.

    ``parameter_ratio`` (parameters), ``size_ratio`` (bytes: the teacher's file against the
    student's serialized weights), ``compression_ratio`` (API.md's name: the parameter ratio)
    and ``speedup`` (latency p50 at batch 1).
    """
    parameter_ratio = _ratio(teacher_metrics.get("parameters"), student_metrics.get("parameters"))
    return {
        "parameter_ratio": parameter_ratio,
        "size_ratio": _ratio(teacher_metrics.get("size_bytes"), student_metrics.get("size_bytes")),
        "compression_ratio": parameter_ratio,
        "speedup": _ratio(
            teacher_metrics.get("latency_ms_p50"), student_metrics.get("latency_ms_p50")
        ),
    }


# --- interleaved timing ------------------------------------------------------------------------

NOISY_SPREAD = 0.5  # (max - min) / median across rounds above this marks a figure noisy


@dataclass
class Timing:
    """One model's calls, round by round: seconds per batch-1 call and inputs per second."""

    calls: list[list[float]] = field(default_factory=list)  # per round, each call's seconds
    throughput: list[float] = field(default_factory=list)  # per round

    @property
    def round_ms(self) -> list[float]:
        """Each round's median batch-1 latency in milliseconds."""
        return [1000.0 * statistics.median(c) for c in self.calls]

    def metrics(self) -> dict[str, Any]:
        """p50 across rounds, the pooled p95, each figure's min–max range across rounds and
        ``latency_noisy`` when the rounds disagree by more than NOISY_SPREAD of the median."""
        rounds = self.round_ms
        pooled = sorted(1000.0 * t for c in self.calls for t in c)
        p50 = statistics.median(rounds)
        return {
            "latency_ms_p50": p50,
            "latency_ms_p95": pooled[min(len(pooled) - 1, math.ceil(0.95 * len(pooled)) - 1)],
            "latency_ms_range": [min(rounds), max(rounds)],
            "throughput_per_s": statistics.median(self.throughput),
            "throughput_range": [min(self.throughput), max(self.throughput)],
            "latency_noisy": spread(rounds) > NOISY_SPREAD,
        }


def spread(values: list[float]) -> float:
    """(max - min) / median: 0 when every round agrees; 0.5 when they span half the median."""
    middle = statistics.median(values)
    return (max(values) - min(values)) / middle if middle > 0 else 0.0


def interleaved_timing(
    models: dict[str, Any],
    example: torch.Tensor,
    *,
    devices: dict[str, torch.device] | None = None,
    rounds: int = 7,
    calls: int = 30,
    batch_calls: int = 3,
    batch_size: int = 256,
    warmup: int = 5,
    max_seconds: float = 3.0,
    threads: int | None = 1,
) -> dict[str, Timing]:
    """Time several models in alternating rounds, so that a slow spell of a shared machine
    falls on all of them rather than on whichever happened to be measured then.

    Each round times every model in turn (the order rotates from round to round): up to
    ``calls`` batch-1 calls, then ``batch_calls`` calls at ``batch_size`` inputs (or all of
    ``example``). ``max_seconds`` bounds the whole measurement: each model's share of a round
    stops early once spent, after at least 3 calls. ``devices`` maps a model to where its
    inputs go (default the CPU). Runs under ``torch.inference_mode`` on ``threads`` torch
    threads (None: torch's current count), synchronising CUDA after every call on a GPU.

    One thread by default: on a CPU shared with other processes, a call split over several
    threads waits for the slowest of them, and its time jumps by orders of magnitude whenever
    one is descheduled; one thread gives figures that repeat.
    """
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _interleaved(models, example, devices, rounds, calls, batch_calls, batch_size,
                            warmup, max_seconds)  # fmt: skip
    finally:
        torch.set_num_threads(before)


def _interleaved(
    models: dict[str, Any],
    example: torch.Tensor,
    devices: dict[str, torch.device] | None,
    rounds: int,
    calls: int,
    batch_calls: int,
    batch_size: int,
    warmup: int,
    max_seconds: float,
) -> dict[str, Timing]:
    names = list(models)
    where = {name: torch.device((devices or {}).get(name, "cpu")) for name in names}
    runners = {name: _runner(models[name], where[name]) for name in names}
    single = {name: example[:1].to(where[name]) for name in names}
    batch = {name: example[:batch_size].to(where[name]) for name in names}
    share = max_seconds / max(1, rounds * len(names))
    timings = {name: Timing() for name in names}
    with torch.inference_mode():
        for name, run in runners.items():
            for _ in range(warmup):
                run(single[name])
            run(batch[name])
            _sync(where[name])
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                run, timing, device = runners[name], timings[name], where[name]
                timing.calls.append(_timed_runs(run, single[name], device, calls, share / 2))
                per_batch = statistics.median(
                    _timed_runs(run, batch[name], device, batch_calls, share / 2)
                )
                timing.throughput.append(len(batch[name]) / per_batch if per_batch > 0 else 0.0)
    return timings


def paired_speedup(teacher: Timing, student: Timing) -> dict[str, Any]:
    """``speedup``: the median over rounds of teacher / student latency measured in the same
    round, its min–max ``speedup_range`` and ``speedup_noisy``."""
    ratios = [t / s for t, s in zip(teacher.round_ms, student.round_ms, strict=True) if s > 0]
    if not ratios:
        return {"speedup": None, "speedup_range": None, "speedup_noisy": None}
    return {
        "speedup": float(f"{statistics.median(ratios):.4g}"),
        "speedup_range": [float(f"{min(ratios):.4g}"), float(f"{max(ratios):.4g}")],
        "speedup_noisy": spread(ratios) > NOISY_SPREAD,
    }


# --- the verdict: distilled student against the labels-only baseline ---------------------------

ALPHA = 0.05
VERDICTS = ("distillation_helped", "no_significant_difference", "baseline_better")


def baseline_verdict(
    student_outputs: torch.Tensor,
    baseline_outputs: torch.Tensor,
    y: torch.Tensor | None,
    *,
    task: str,
    alpha: float = ALPHA,
) -> dict[str, Any] | None:
    """Whether distillation beat training on the labels alone, on the same samples, paired.

    classification: McNemar's exact test, i.e. a two-sided binomial test on the samples where
    exactly one of the two models is right (``student_only_correct`` against
    ``baseline_only_correct``). regression with float targets: the Wilcoxon signed-rank test on
    the per-sample squared errors. ``verdict`` is ``distillation_helped`` or
    ``baseline_better`` when ``p_value < alpha``, else ``no_significant_difference``. ``None``
    when there are no labels to judge by.
    """
    if y is None:
        return None
    student_outputs = student_outputs.float().cpu()
    baseline_outputs = baseline_outputs.float().cpu()
    y = y.cpu()
    if task == "classification" and not y.is_floating_point():
        keep = y >= 0
        if not bool(keep.any()):
            return None
        truth = y[keep]
        student_right = student_outputs[keep].argmax(-1) == truth
        baseline_right = baseline_outputs[keep].argmax(-1) == truth
        return _mcnemar(student_right.numpy(), baseline_right.numpy(), alpha)
    if task == "regression" and y.is_floating_point():
        n = len(y)
        target = y.reshape(n, -1)
        student_err = ((student_outputs.reshape(n, -1) - target) ** 2).mean(1).numpy()
        baseline_err = ((baseline_outputs.reshape(n, -1) - target) ** 2).mean(1).numpy()
        return _wilcoxon(student_err, baseline_err, alpha)
    return None


def _mcnemar(student_right: np.ndarray, baseline_right: np.ndarray, alpha: float) -> dict[str, Any]:
    from scipy.stats import binomtest

    n = len(student_right)
    b = int((student_right & ~baseline_right).sum())
    c = int((baseline_right & ~student_right).sum())
    p = float(binomtest(b, b + c, 0.5).pvalue) if b + c else 1.0
    diff = (b - c) / n
    # Wald interval of a difference of paired proportions (the test above decides, this shows).
    half = 1.96 * math.sqrt(max(b + c - (b - c) ** 2 / n, 0.0)) / n
    return {
        "verdict": _decide(p, diff, alpha),
        "metric": "accuracy",
        "student": float(student_right.mean()),
        "baseline": float(baseline_right.mean()),
        "difference": diff,
        "difference_ci95": [diff - half, diff + half],
        "test": "mcnemar_exact",
        "p_value": p,
        "alpha": alpha,
        "n": n,
        "student_only_correct": b,
        "baseline_only_correct": c,
    }


def _wilcoxon(student_err: np.ndarray, baseline_err: np.ndarray, alpha: float) -> dict[str, Any]:
    from scipy.stats import wilcoxon

    delta = baseline_err - student_err  # above 0: the student's error is lower
    p = float(wilcoxon(delta).pvalue) if bool(np.any(delta != 0)) else 1.0
    p = 1.0 if math.isnan(p) else p
    diff = float(delta.mean())
    return {
        "verdict": _decide(p, diff, alpha),
        "metric": "mse_to_labels",
        "student": float(student_err.mean()),
        "baseline": float(baseline_err.mean()),
        "difference": diff,
        "test": "wilcoxon_signed_rank",
        "p_value": p,
        "alpha": alpha,
        "n": len(delta),
    }


def _decide(p_value: float, student_advantage: float, alpha: float) -> str:
    if p_value >= alpha or student_advantage == 0:
        return "no_significant_difference"
    return "distillation_helped" if student_advantage > 0 else "baseline_better"
