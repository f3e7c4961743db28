"""Measure a model, teacher or student alike: quality, size and speed, and compare two of them.

Every function returns plain Python floats and ints, ready for a job's ``result``.
"""

from __future__ import annotations

import io
import math
import statistics
import time
from collections.abc import Callable
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
    """numerator / denominator, or None when either is missing or not positive."""
    if not isinstance(numerator, (int, float)) or not isinstance(denominator, (int, float)):
        return None
    if numerator <= 0 or denominator <= 0:
        return None
    return round(float(numerator) / float(denominator), 3)


def compare(teacher_metrics: dict[str, Any], student_metrics: dict[str, Any]) -> dict[str, Any]:
    """``compression_ratio`` (teacher size / student size) and ``speedup`` (teacher p50 /
    student p50); ``None`` where a value is missing or zero."""
    return {
        "compression_ratio": _ratio(
            teacher_metrics.get("size_bytes"), student_metrics.get("size_bytes")
        ),
        "speedup": _ratio(
            teacher_metrics.get("latency_ms_p50"), student_metrics.get("latency_ms_p50")
        ),
    }
