"""A job's measurements: quality, size and latency of the teacher, the students and the
baseline on the validation split; compression steps measured before and after; and teacher,
student and baseline timed in alternating rounds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnxruntime as ort
import torch
from torch import nn

from core.distill import compress, evaluate, export
from core.distill.progress import Reporter
from core.distill.types import Teacher, TransferSet
from core.spec import JobSpec

TIMING_THREADS = 1  # see evaluate.interleaved_timing: figures that repeat on a shared CPU


def measure(
    model: nn.Module,
    data: TransferSet,
    teacher_val: torch.Tensor,
    task: str,
    device: torch.device,
    *,
    latency: bool = True,
) -> tuple[dict[str, Any], torch.Tensor]:
    """Quality, size and (unless ``latency`` is off) latency of a student on the validation
    split, and its outputs there."""
    model = model.eval()
    outputs = evaluate.predict(model, data.x_val, device=device)
    metrics = {
        **evaluate.quality_metrics(outputs, task=task, y=data.y_val, teacher_outputs=teacher_val),
        **evaluate.size_metrics(model),
    }
    if latency:
        metrics.update(evaluate.latency_metrics(model, data.x_val, device=device))
    return metrics, outputs


def teacher_metrics(
    teacher: Teacher, data: TransferSet, teacher_val: torch.Tensor, task: str
) -> dict[str, Any]:
    """The teacher's quality on the validation split (``teacher_val``: its outputs), and size."""
    quality = evaluate.quality_metrics(teacher_val, task=task, y=data.y_val, teacher_outputs=None)
    return {**quality, "parameters": int(teacher.parameters), "size_bytes": int(teacher.size_bytes)}


def timing(
    teacher: Teacher,
    student: nn.Module,
    baseline: nn.Module | None,
    result: dict[str, Any],
    *,
    onnx_file: Path | None,
    data: TransferSet,
    device: torch.device,
    staging: Path,
) -> dict[str, Any]:
    """Latency and throughput of teacher, student (in torch and under onnxruntime) and baseline,
    timed in alternating rounds; writes them into ``result``'s blocks and returns the ratios,
    the paired ``speedup`` (in the teacher's runtime) and the ``timing`` block."""
    student_device = module_device(student, device)
    models: dict[str, Any] = {"teacher": teacher, "student": student}
    devices = {"teacher": device, "student": student_device}
    session = _onnx_session(student, data, onnx_file, staging / ".timing.onnx")
    if session is not None:
        models["student_onnx"], devices["student_onnx"] = session, torch.device("cpu")
    if baseline is not None:
        models["baseline"], devices["baseline"] = baseline, module_device(baseline, device)
    timings = evaluate.interleaved_timing(
        models, data.x_val, devices=devices, threads=TIMING_THREADS
    )
    for name in ("teacher", "student", "baseline"):
        if name in timings:
            result[name].update(timings[name].metrics())
    if "student_onnx" in timings:
        onnx = timings["student_onnx"].metrics()
        result["student"].update(
            {
                "latency_ms_p50_onnx": onnx["latency_ms_p50"],
                "latency_ms_range_onnx": onnx["latency_ms_range"],
                "throughput_per_s_onnx": onnx["throughput_per_s"],
            }
        )
    # The teacher against the student in the teacher's runtime (torch when the student's ONNX
    # session could not be made).
    runtime = "onnxruntime" if _runtime(teacher) == "onnxruntime" and session else "torch"
    same = timings["student_onnx"] if runtime == "onnxruntime" else timings["student"]
    speed = evaluate.paired_speedup(timings["teacher"], same)
    figures = {**evaluate.compare(result["teacher"], result["student"]), **speed}
    noisy = [t.metrics()["latency_noisy"] for t in timings.values()]
    figures["timing"] = {
        "interleaved": True,
        "rounds": len(timings["teacher"].calls),
        "speedup_runtime": runtime,
        "threads": TIMING_THREADS,
        "batch_size": min(len(data.x_val), 256),
        "noisy": bool(any(noisy) or speed["speedup_noisy"]),
    }
    return figures


def _runtime(teacher: Teacher) -> str:
    """Where the teacher runs: ``onnxruntime`` (an ONNX upload) or ``torch``."""
    members = getattr(teacher, "teachers", None) or [teacher]
    formats = {m.info.format for m in members}
    return "onnxruntime" if formats == {"onnx"} else "torch"


def module_device(module: nn.Module, default: torch.device) -> torch.device:
    """Where a module's parameters are (``default`` when it has none)."""
    param = next(iter(module.parameters()), None)
    return param.device if param is not None else default


def _onnx_session(
    student: nn.Module, data: TransferSet, exported: Path | None, scratch: Path
) -> Any:
    """An onnxruntime session of the student (the exported file, or a scratch export that is
    removed at once) on TIMING_THREADS threads; None when the student does not export."""
    if hasattr(student, "tokenizer"):  # an hf student's ONNX takes ids and mask, not x
        return None
    path = exported
    try:
        if path is None or not path.is_file():
            path = scratch
            export.export_onnx(student, data.x_val[:2], path, check_inputs=data.x_val[:64])
        options = ort.SessionOptions()
        options.intra_op_num_threads = TIMING_THREADS
        options.inter_op_num_threads = 1
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception:  # a figure we cannot take is reported missing, never fails the job
        return None
    finally:
        scratch.unlink(missing_ok=True)


def compress_and_measure(
    student: nn.Module,
    measured: tuple[dict[str, Any], torch.Tensor],
    spec: JobSpec,
    data: TransferSet,
    teacher_val: torch.Tensor,
    task: str,
    device: torch.device,
    report: Reporter,
) -> tuple[nn.Module, tuple[dict[str, Any], torch.Tensor], list[dict[str, Any]]]:
    """Prune, then quantize the student; measure after each step (before = the step before)."""
    steps: list[dict[str, Any]] = []
    prune = spec.compression.prune
    if prune is not None:
        kind = "structured" if prune.structured else "unstructured"
        report.log(f"pruning {prune.amount:.0%} of the student's weights ({kind})")
        student = compress.prune(
            student,
            amount=prune.amount,
            structured=prune.structured,
            example_input=data.x_val[:2].to(device),
        ).eval()
        after = measure(student, data, teacher_val, task, device)
        steps.append(
            {"step": "prune", **prune.model_dump(), "before": measured[0], "after": after[0]}
        )
        measured = after
    if spec.compression.quantize != "none":
        mode = spec.compression.quantize
        report.log(f"quantizing the student ({mode})")
        where = _quantized_device(mode, device)
        calibration = data.x_train[: min(len(data.x_train), 512)].to(where)
        student = compress.quantize(student.to(where), mode, calibration=calibration).eval()
        after = measure(student, data, teacher_val, task, where)
        steps.append({"step": "quantize", "mode": mode, "before": measured[0], "after": after[0]})
        measured = after
    return student, measured, steps


def _quantized_device(mode: str, device: torch.device) -> torch.device:
    # int8 kernels run on the CPU; fp16 runs wherever the job runs.
    return device if mode == "fp16" else torch.device("cpu")
