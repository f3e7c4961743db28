"""The engine's one entry point: a completed job from files on disk to measured artifacts.

:func:`run_job` loads the teacher(s) and the transfer set, completes the spec, distils the chain
of stages (teacher → assistant → … → student, :mod:`core.distill.stages`), trains a labels-only
baseline beside it, applies compression, evaluates teacher and student on the validation split,
and exports the student. The worker and ``distill run`` both call it; it knows nothing of HTTP,
Celery or the database.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core.distill import evaluate, export
from core.distill.causal.pipeline import run_causal
from core.distill.data import dataset_info, load_transfer_set
from core.distill.hf.export import export_hf_student
from core.distill.hf.text import load_text_transfer_set
from core.distill.measures import (
    compress_and_measure,
    measure,
    module_device,
    teacher_metrics,
    timing,
)
from core.distill.progress import Reporter, check_stop
from core.distill.search import Found
from core.distill.stages import (
    StageContext,
    as_teacher,
    baseline_stage,
    chain_stage,
    default_method,
    find_settings,
    model_key,
    train_stage,
    tuned_stage,
)
from core.distill.teacher_io import dtype_name
from core.distill.teachers import EnsembleTeacher, load_teacher
from core.distill.trainer import resolve_device
from core.distill.types import (
    Artifact,
    Event,
    JobOutcome,
    ModelFile,
    ProgressFn,
    StopFn,
    Teacher,
    TransferSet,
)
from core.errors import ClientError, InvalidSpec, ShapeMismatch
from core.spec import JobSpec, ModelInfo, TensorInfo, complete_spec

# Artifact file names and kinds (API.md, "Artifacts").
EXPORTS: dict[str, list[tuple[str, str]]] = {
    "torchscript": [("student.pt", "student_torchscript")],
    "onnx": [("student.onnx", "student_onnx")],
    "safetensors": [
        ("student.safetensors", "student_safetensors"),
        ("student.arch.json", "student_arch"),
    ],
    "hf": [("student_hf.zip", "student_hf")],
}
EVAL_BATCH = 512
# The delivered student's figures in the job's last metrics event: result key → event key.
DELIVERED_METRICS = {
    "accuracy": "val_accuracy",
    "f1_macro": "val_f1_macro",
    "agreement": "val_agreement",
    "kl_to_teacher": "val_kl_to_teacher",
    "mse": "val_mse_to_teacher",
    "cosine": "val_cosine_to_teacher",
    "mse_to_labels": "val_mse_to_labels",
}


def run_job(
    spec: JobSpec,
    *,
    models: dict[str, ModelFile],
    dataset: Path,
    dataset_options: dict[str, Any] | None = None,
    out_dir: Path,
    work_dir: Path,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> JobOutcome:
    """Run one distillation job; write its artifacts into ``out_dir`` (all of them, or none).

    ``models`` maps every model reference of the spec (``model_id``, or ``path`` for local runs)
    to a file on disk. ``work_dir`` holds checkpoints: a re-run with the same one resumes.
    Raises ClientError subclasses for problems found only now and JobError subclasses for a
    job that ran and failed.
    """
    out_dir, work_dir = Path(out_dir), Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        outcome = _run(
            spec,
            models=models,
            dataset=Path(dataset),
            dataset_options=dict(dataset_options or {}),
            staging=staging,
            work_dir=work_dir,
            report=Reporter(progress or (lambda _e: None)),
            should_stop=should_stop or (lambda: False),
        )
        outcome.artifacts = _publish(staging, out_dir, outcome.artifacts)
        return outcome
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _run(
    spec: JobSpec,
    *,
    models: dict[str, ModelFile],
    dataset: Path,
    dataset_options: dict[str, Any],
    staging: Path,
    work_dir: Path,
    report: Reporter,
    should_stop: StopFn,
) -> JobOutcome:
    started = time.monotonic()
    training = spec.training
    device = resolve_device(training.device)
    torch.manual_seed(training.seed)

    hf_teacher = _hf_teacher(spec, models, _teacher_device(training, device))
    if hf_teacher is not None and hf_teacher.hf["task"] == "causal_lm":
        return run_causal(
            spec,
            teacher=hf_teacher,
            models=models,
            dataset=dataset,
            staging=staging,
            work_dir=work_dir,
            report=report,
            should_stop=should_stop,
            device=device,
        )
    if hf_teacher is not None:
        data = load_text_transfer_set(
            dataset,
            hf_teacher.tokenizer,
            max_length=training.max_length,
            id2label=hf_teacher.hf.get("id2label"),
            val_fraction=training.val_fraction,
            seed=training.seed,
        )
    else:
        data = load_transfer_set(
            dataset,
            options=dataset_options,
            val_fraction=training.val_fraction,
            seed=training.seed,
        )
    if len(data.x_val) == 0:
        raise InvalidSpec(
            "the job has no validation samples to measure the student on; set "
            "training.val_fraction above 0 or give x_val in the dataset",
            field="training.val_fraction",
        )
    if hf_teacher is not None:
        teachers: list[Teacher] = [hf_teacher]
        infos = [_probe(hf_teacher, data, "teacher", device)]
    else:
        teachers, infos = _load_teachers(spec, models, data, device)
    spec = complete_spec(spec, infos, dataset_info(data))
    task = spec.task
    assert task is not None
    teacher = _ensemble(spec, teachers, task)
    check_stop(should_stop)

    with_baseline = bool(training.baseline and data.has_labels)
    teacher_val = _teacher_outputs(teacher, data.x_val, device)
    out_dim = int(teacher_val.shape[-1]) if teacher_val.dim() > 1 else 1
    ctx = StageContext(
        spec=spec,
        models=models,
        data=data,
        teacher=teacher,
        out_dim=out_dim,
        n_classes=data.n_classes or (out_dim if task == "classification" else None),
        stages=len(spec.chain()) + int(with_baseline),
        work_dir=work_dir,
        report=report,
        should_stop=should_stop,
    )
    report.phase("settings")  # the lr trials, or tune
    spec, found = find_settings(ctx, started=started)
    ctx = replace(ctx, spec=spec)
    report.phase("training")
    student, measured, stage_results = _distil_chain(ctx, found, teacher_val, device)
    distilled_val = measured[1]  # before compression: the baseline's architecture

    baseline: tuple[nn.Module, dict[str, Any], torch.Tensor] | None = None
    report.phase("baseline")
    if with_baseline:
        baseline_model = train_stage(ctx, baseline_stage(ctx))
        baseline_metrics, baseline_val = measure(
            baseline_model, data, teacher_val, task, device, latency=False
        )
        baseline = (baseline_model, baseline_metrics, baseline_val)

    compression: list[dict[str, Any]] = []
    report.phase("compression")
    if spec.compression.prune is not None or spec.compression.quantize != "none":
        student, measured, compression = compress_and_measure(
            student, measured, spec, data, teacher_val, task, device, report
        )
    check_stop(should_stop)
    student_metrics, student_val = measured

    report.phase("evaluation")
    report.log("measuring the teacher on the validation split")
    result: dict[str, Any] = {
        "teacher": teacher_metrics(teacher, data, teacher_val, task),
        "student": student_metrics,
        "task": task,
        "method": stage_results[-1]["method"],
        "device": str(device),
        "stages": stage_results,
        "compression": compression,
    }
    if baseline is not None:
        result["baseline"] = baseline[1]
        comparison = evaluate.baseline_verdict(distilled_val, baseline[2], data.y_val, task=task)
        if comparison is not None:
            # The same architecture on both sides: compression, if any, comes after.
            comparison["student_model"] = "before_compression" if compression else "delivered"
            result["verdict"] = comparison["verdict"]
            result["baseline_comparison"] = comparison
    result.update(found.report(spec.model_dump(mode="json")))
    check_stop(should_stop)

    report.phase("export")
    where = module_device(student, device)
    artifacts, checks = _export(
        student, spec.export, data, staging=staging, report=report, name="student"
    )
    student = student.to(where)  # exporting moved it to the CPU; it is timed where it runs
    _write_validation(data, teacher_val, student_val, staging)
    artifacts.append(Artifact("validation.npz", "validation_data", staging / "validation.npz"))
    result["export"] = checks
    check_stop(should_stop)

    report.phase("timing")
    report.log("timing teacher and student in alternating rounds")
    result.update(
        timing(
            teacher,
            student,
            None if baseline is None else baseline[0],
            result,
            onnx_file=staging / "student.onnx" if "onnx" in spec.export else None,
            data=data,
            device=device,
            staging=staging,
        )
    )
    if result.get("verdict") == "baseline_better":
        assert baseline is not None
        result["warning"] = _baseline_warning(result["baseline_comparison"], spec.export)
        report.log(f"warning: {result['warning']}")
        result["recommended"] = "baseline"
        report.phase("export")
        more, _ = _export(
            baseline[0], spec.export, data, staging=staging, report=report, name="baseline"
        )
        artifacts.extend(more)
    else:
        result["recommended"] = "student"
    result["student_io"] = export.student_io(data.x_train, student_val, task, data.class_names)
    report.progress(Event("metrics", _delivered_metrics(result)))
    result["seconds"] = round(time.monotonic() - started, 3)
    result["seconds_by_phase"] = report.seconds_by_phase()
    report_path = staging / "report.json"
    export.write_report(report_path, result, report.history, spec.model_dump(mode="json"))
    artifacts.append(Artifact("report.json", "report", report_path))
    return JobOutcome(result=result, history=report.history, artifacts=artifacts)


def _distil_chain(
    ctx: StageContext, found: Found, teacher_val: torch.Tensor, device: torch.device
) -> tuple[nn.Module, tuple[dict[str, Any], torch.Tensor], list[dict[str, Any]]]:
    """Train the chain, each stage learning from the one before (the first from the teacher);
    the last stage's student, its measures, and every stage's row of the result."""
    spec, task = ctx.spec, ctx.spec.task or ""
    chain = spec.chain()
    current = ctx.teacher
    rows: list[dict[str, Any]] = []
    for i, stage in enumerate(chain):
        if i == 0 and found.tune is not None:
            student = tuned_stage(ctx, found.tune.best)
        else:
            student = train_stage(ctx, chain_stage(ctx, i, current))
        measured = measure(student, ctx.data, teacher_val, task, device)
        method = (stage.distillation or spec.distillation or default_method(task)).method
        rows.append(
            {
                "stage": i + 1,
                "student": stage.student.model_dump(exclude_none=True),
                "method": method,
                **measured[0],
            }
        )
        if i + 1 < len(chain):
            current = as_teacher(student, ctx.data, ctx.out_dim)
    return student, measured, rows


def _baseline_warning(comparison: dict[str, Any], formats: list[str]) -> str:
    """The line that tells a user plainly that distillation lost to the labels alone."""
    metric = comparison["metric"]
    student, baseline = comparison["student"], comparison["baseline"]
    if metric == "accuracy":
        figures = f"accuracy {100 * student:.1f}% against {100 * baseline:.1f}%"
    else:
        figures = f"{metric} {student:.4g} against {baseline:.4g}"
    offered = "; its files (baseline.*) are offered beside the student's" if formats else ""
    which = " (before compression)" if comparison["student_model"] == "before_compression" else ""
    return (
        f"the labels-only baseline beat the distilled student{which} on the validation split "
        f"({figures}, p = {comparison['p_value']:.2g}){offered}. Check the teacher's quality "
        "on these data."
    )


def _delivered_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """The delivered student's validation figures as the job's last metrics event (so a job's
    top-level ``metrics`` after success are the student's, not the baseline's last epoch)."""
    data: dict[str, Any] = {"label": "delivered student", "final": True}
    student = result["student"]
    data.update({name: student[k] for k, name in DELIVERED_METRICS.items() if k in student})
    if "verdict" in result:
        data["verdict"] = result["verdict"]
    return data


# --- inputs ------------------------------------------------------------------------------------


def _teacher_device(training: Any, device: torch.device) -> torch.device:
    from core.distill.causal.placement import teacher_device

    return teacher_device(training, device)


def _hf_teacher(spec: JobSpec, models: dict[str, ModelFile], device: torch.device) -> Any:
    """The teacher when it is an ``hf`` upload (its tokenizer reads the text), else None."""
    refs = spec.teacher_refs()
    key = model_key(refs[0])
    if len(refs) != 1 or key not in models or models[key].format != "hf":
        return None
    return load_teacher(models[key], device)


def _load_teachers(
    spec: JobSpec, models: dict[str, ModelFile], data: TransferSet, device: torch.device
) -> tuple[list[Teacher], list[ModelInfo]]:
    """Each teacher of the spec and its signature, probed on real inputs."""
    loaded: list[Teacher] = []
    infos: list[ModelInfo] = []
    for where, ref in spec.teacher_fields():
        key = model_key(ref)
        if key not in models:
            raise InvalidSpec(f"no model file was given for '{key}'", field=where)
        teacher = load_teacher(models[key], device, input_shape=tuple(data.x_train.shape[1:]))
        infos.append(_probe(teacher, data, where, device))
        loaded.append(teacher)
    return loaded, infos


def _ensemble(spec: JobSpec, teachers: list[Teacher], task: str) -> Teacher:
    """One teacher as is; several as their weighted ensemble."""
    if len(teachers) == 1:
        return teachers[0]
    weights = [ref.weight for ref in spec.teacher_refs()]
    return EnsembleTeacher(teachers, weights, task=task)


def _probe(teacher: Teacher, data: TransferSet, field: str, device: torch.device) -> ModelInfo:
    """Run the teacher on two real inputs: a shape its signature did not reveal fails here."""
    sample = data.x_train[:2].to(device)
    declared = teacher.info.inputs[0].shape if teacher.info.inputs else None
    packed = teacher.info.hf is not None  # (N, 2, L) token ids and attention mask
    if declared is not None and not packed and not _fits(declared[1:], list(sample.shape[1:])):
        raise ShapeMismatch(
            f"the teacher takes inputs of shape {['N', *declared[1:]]} but the dataset's x has "
            f"shape {['N', *sample.shape[1:]]}; upload a dataset shaped like the teacher's input",
            field=field,
        )
    try:
        out = teacher.predict(sample)
    except ClientError:
        raise
    except Exception as exc:  # the teacher's own code failed on these inputs
        raise ShapeMismatch(
            f"the teacher cannot run on the dataset's inputs of shape "
            f"{['N', *data.x_train.shape[1:]]} ({type(exc).__name__}: {_first_line(exc)}); "
            "upload a dataset shaped like the teacher's input",
            field=field,
        ) from None
    if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != len(sample):
        raise ShapeMismatch(
            "the teacher must return one tensor with the batch as its first dimension",
            field=field,
        )
    info = teacher.info
    return ModelInfo(
        format=info.format,
        inputs=[TensorInfo(shape=[None, *sample.shape[1:]], dtype=dtype_name(sample.dtype))],
        outputs=[TensorInfo(shape=[None, *out.shape[1:]], dtype=dtype_name(out.dtype))],
        trainable=info.trainable,
        arch=info.arch,
        parameters=int(teacher.parameters) or None,
        hf=info.hf,
    )


def _teacher_outputs(teacher: Teacher, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Teacher outputs for ``x`` in batches, on the CPU, as float32."""
    parts = [
        teacher.predict(x[i : i + EVAL_BATCH].to(device)).detach().float().cpu()
        for i in range(0, len(x), EVAL_BATCH)
    ]
    return torch.cat(parts)


# --- export ------------------------------------------------------------------------------------


def _export(
    model: nn.Module,
    formats: list[str],
    data: TransferSet,
    *,
    staging: Path,
    report: Reporter,
    name: str,
) -> tuple[list[Artifact], dict[str, Any]]:
    """Write each requested format of ``model`` as ``{name}.*`` with kinds ``{name}_*``; return
    the artifacts and the export checks."""
    model = model.cpu().eval()
    if hasattr(model, "tokenizer") and hasattr(model, "run"):  # a Hugging Face model
        return export_hf_student(model, formats, data.x_val, staging, report.log, name=name)
    example = data.x_val[:2].cpu()
    artifacts: list[Artifact] = []
    checks: dict[str, Any] = {}
    for fmt in formats:
        report.log(f"exporting the {name} as {fmt}")
        names = [
            (file.replace("student", name, 1), kind.replace("student", name, 1))
            for file, kind in EXPORTS[fmt]
        ]
        path = staging / names[0][0]
        if fmt == "torchscript":
            export.export_torchscript(model, example, path)
        elif fmt == "onnx":
            checks["onnx"] = export.export_onnx(model, example, path, check_inputs=data.x_val)
        elif fmt == "safetensors":
            json_path = export.export_safetensors(model, path, example=example)
            assert json_path.name == names[1][0]
        artifacts.extend(Artifact(file, kind, staging / file) for file, kind in names)
    return artifacts, checks


def _write_validation(
    data: TransferSet, teacher_val: torch.Tensor, student_val: torch.Tensor, staging: Path
) -> None:
    """validation.npz: the inputs, labels and both models' outputs the result was measured on."""
    arrays: dict[str, np.ndarray] = {
        "x_val": data.x_val.cpu().numpy(),
        "teacher_outputs": teacher_val.numpy(),
        "student_outputs": student_val.float().cpu().numpy(),
    }
    if data.y_val is not None:
        arrays["y_val"] = data.y_val.cpu().numpy()
    np.savez_compressed(staging / "validation.npz", **arrays)


def _publish(staging: Path, out_dir: Path, artifacts: list[Artifact]) -> list[Artifact]:
    """Move the finished files into ``out_dir`` (created if missing; other files are kept)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    published = []
    for artifact in artifacts:
        target = out_dir / artifact.name
        artifact.path.replace(target)
        published.append(Artifact(artifact.name, artifact.kind, target))
    return published


# --- small helpers -----------------------------------------------------------------------------


def _fits(expected: list[int | None], got: list[int]) -> bool:
    return len(expected) == len(got) and all(
        e is None or e == g for e, g in zip(expected, got, strict=True)
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else ""
