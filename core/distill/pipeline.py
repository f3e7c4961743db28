"""The engine's one entry point: a completed job from files on disk to measured artifacts.

:func:`run_job` loads the teacher(s) and the transfer set, completes the spec, distils the chain
of stages (teacher → assistant → … → student), trains a labels-only baseline beside it, applies
compression, evaluates teacher and student on the validation split, and exports the student.
The worker and ``distill run`` both call it; it knows nothing of HTTP, Celery or the database.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

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
from core.errors import Cancelled, ClientError, InvalidSpec, ShapeMismatch
from core.spec import (
    MAX_EPOCHS,
    JobSpec,
    KDMethod,
    ModelInfo,
    ModelRef,
    MSEMethod,
    StageSpec,
    StudentSpec,
    TensorInfo,
    TrainingSpec,
    complete_spec,
    undecided,
)

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
TIMING_THREADS = 1  # see evaluate.interleaved_timing: figures that repeat on a shared CPU
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
STATS_ROWS = 20_000  # rows that give the student's input statistics
TIME_SHARE = 0.8  # share of max_minutes that auto epochs may fill (the rest: evaluation, export)
TUNE_SHARE = 0.6  # share of what is left of max_minutes that tune may use without budget_minutes


def model_key(ref: ModelRef | StudentSpec) -> str:
    """The key of a model reference in ``run_job``'s ``models`` mapping."""
    key = ref.model_id or ref.path
    if key is None:
        raise InvalidSpec("a model reference needs a model_id or a path", field="teacher")
    return key


@dataclass
class _Reporter:
    """Wraps the caller's progress callback for the whole job.

    The trainer reports each stage's fraction from 0 to 1; this turns it into the job's
    fraction (stage ``k`` of ``n`` covers ``(k-1)/n .. k/n``, so it only grows), extends the
    ETA to the stages still to come, labels events with the running stage, and keeps the
    metric history of every stage (epochs restored from a checkpoint included).
    """

    progress: ProgressFn
    history: list[dict[str, Any]] = field(default_factory=list)
    label: str = ""
    stage_started: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)  # seconds spent in each phase
    phase_name: str = "load"
    phase_started: float = field(default_factory=time.monotonic)

    def phase(self, name: str) -> None:
        """From now on the time goes to phase ``name`` (the result's ``seconds_by_phase``)."""
        now = time.monotonic()
        self.phases[self.phase_name] = (
            self.phases.get(self.phase_name, 0.0) + now - self.phase_started
        )
        self.phase_name, self.phase_started = name, now

    def seconds_by_phase(self) -> dict[str, float]:
        self.phase(self.phase_name)
        return {name: round(seconds, 3) for name, seconds in self.phases.items()}

    def start(self, label: str) -> None:
        self.label = label
        self.stage_started = time.monotonic()

    def __call__(self, event: Event) -> None:
        data = dict(event.data)
        if event.type == "progress":
            stage, stages = int(data.get("stage", 1)), int(data.get("stages", 1))
            within = float(data.get("fraction") or 0.0)
            data["stage_fraction"] = within
            data["fraction"] = round((stage - 1 + within) / stages, 4)
            eta = data.get("eta_seconds")
            if eta is not None and within > 0:
                per_stage = (time.monotonic() - self.stage_started) / within
                data["eta_seconds"] = round(float(eta) + (stages - stage) * per_stage, 1)
            data["label"] = self.label
        elif event.type == "metrics":
            data["label"] = self.label
        self.progress(Event(event.type, data))

    def keep(self, rows: list[dict[str, Any]]) -> None:
        """A finished stage's epochs (those restored from a checkpoint too) for the report."""
        self.history.extend({**row, "label": self.label} for row in rows)

    def stage_done(self, stage: int, stages: int) -> None:
        """A stage that stopped early still moves the job's fraction to its end."""
        self.progress(
            Event(
                "progress",
                {
                    "stage": stage,
                    "stages": stages,
                    "fraction": round(stage / stages, 4),
                    "stage_fraction": 1.0,
                    "eta_seconds": None,
                    "label": self.label,
                },
            )
        )

    def log(self, message: str) -> None:
        self.progress(Event("log", {"message": message}))


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
            report=_Reporter(progress or (lambda _e: None)),
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
    report: _Reporter,
    should_stop: StopFn,
) -> JobOutcome:
    from core.distill import evaluate, export
    from core.distill.data import dataset_info, load_transfer_set
    from core.distill.trainer import resolve_device

    started = time.monotonic()
    training = spec.training
    device = resolve_device(training.device)
    torch.manual_seed(training.seed)

    hf_teacher = _hf_teacher(spec, models, device)
    if hf_teacher is not None and hf_teacher.hf["task"] == "causal_lm":
        from core.distill.causal.pipeline import run_causal

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
        from core.distill.hf.text import load_text_transfer_set

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
    _check_stop(should_stop)

    chain = spec.chain()
    with_baseline = bool(training.baseline and data.has_labels)
    stages = len(chain) + int(with_baseline)
    x_val = data.x_val
    teacher_val = _teacher_outputs(teacher, x_val, device)
    out_dim = int(teacher_val.shape[-1]) if teacher_val.dim() > 1 else 1
    n_classes = data.n_classes or (out_dim if task == "classification" else None)

    # The chain: each stage learns from the one before (the first from the teacher).
    current: Teacher = teacher
    student: nn.Module | None = None
    stage_results: list[dict[str, Any]] = []
    measured: tuple[dict[str, Any], torch.Tensor] | None = None
    report.phase("settings")  # the lr trials, or tune
    spec, found = _find_settings(
        spec,
        teacher=teacher,
        models=models,
        data=data,
        out_dim=out_dim,
        n_classes=n_classes,
        runs=stages,
        started=started,
        report=report,
        should_stop=should_stop,
    )
    chain = spec.chain()
    report.phase("training")
    for i, stage in enumerate(chain):
        if i == 0 and found.tune is not None:
            student = _tuned_stage(found.tune.best, stages=stages, spec=spec, report=report)
        else:
            student = _distil_stage(
                stage,
                index=i,
                stages=stages,
                teacher=current,
                spec=spec,
                models=models,
                data=data,
                out_dim=out_dim,
                n_classes=n_classes,
                work_dir=work_dir,
                report=report,
                should_stop=should_stop,
            )
        measured = _measure(student, data, teacher_val, task, device)
        method = (stage.distillation or spec.distillation or _default_method(task)).method
        stage_results.append(
            {
                "stage": i + 1,
                "student": stage.student.model_dump(exclude_none=True),
                "method": method,
                **measured[0],
            }
        )
        if i + 1 < len(chain):
            current = _as_teacher(student, data, out_dim)
    assert student is not None and measured is not None
    distilled_val = measured[1]  # before compression: the baseline's architecture

    baseline: tuple[nn.Module, dict[str, Any], torch.Tensor] | None = None
    report.phase("baseline")
    if with_baseline:
        baseline_model = _train_baseline(
            chain[-1],
            stages=stages,
            teacher=teacher,
            spec=spec,
            models=models,
            data=data,
            out_dim=out_dim,
            n_classes=n_classes,
            work_dir=work_dir,
            report=report,
            should_stop=should_stop,
        )
        baseline_metrics, baseline_val = _measure(
            baseline_model, data, teacher_val, task, device, latency=False
        )
        baseline = (baseline_model, baseline_metrics, baseline_val)

    compression: list[dict[str, Any]] = []
    report.phase("compression")
    if spec.compression.prune is not None or spec.compression.quantize != "none":
        student, measured, compression = _compress(
            student, measured, spec, data, teacher_val, task, device, report
        )
    _check_stop(should_stop)
    student_metrics, student_val = measured

    report.phase("evaluation")
    report.log("measuring the teacher on the validation split")
    teacher_metrics = _teacher_metrics(teacher, data, teacher_val, task)
    result: dict[str, Any] = {
        "teacher": teacher_metrics,
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
    _check_stop(should_stop)

    report.phase("export")
    where = _module_device(student, device)
    artifacts, checks = _export(
        student, spec.export, data, staging=staging, report=report, name="student"
    )
    student = student.to(where)  # exporting moved it to the CPU; it is timed where it runs
    _write_validation(data, teacher_val, student_val, staging)
    artifacts.append(Artifact("validation.npz", "validation_data", staging / "validation.npz"))
    result["export"] = checks
    _check_stop(should_stop)

    report.phase("timing")
    report.log("timing teacher and student in alternating rounds")
    result.update(
        _timing(
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


def _hf_teacher(spec: JobSpec, models: dict[str, ModelFile], device: torch.device) -> Any:
    """The teacher when it is an ``hf`` upload (its tokenizer reads the text), else None."""
    from core.distill.teachers import load_teacher

    refs = spec.teacher_refs()
    key = model_key(refs[0])
    if len(refs) != 1 or key not in models or models[key].format != "hf":
        return None
    return load_teacher(models[key], device)


def _load_teachers(
    spec: JobSpec, models: dict[str, ModelFile], data: TransferSet, device: torch.device
) -> tuple[list[Teacher], list[ModelInfo]]:
    """Each teacher of the spec and its signature, probed on real inputs."""
    from core.distill.teachers import load_teacher

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
    from core.distill.teachers import EnsembleTeacher

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
        inputs=[TensorInfo(shape=[None, *sample.shape[1:]], dtype=_dtype(sample))],
        outputs=[TensorInfo(shape=[None, *out.shape[1:]], dtype=_dtype(out))],
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


def _as_teacher(module: nn.Module, data: TransferSet, out_dim: int) -> Teacher:
    """A trained assistant, frozen, as the teacher of the next stage."""
    from core.distill.teachers import ModuleTeacher

    x = data.x_train
    info = ModelInfo(
        format="module",
        inputs=[TensorInfo(shape=[None, *x.shape[1:]], dtype=_dtype(x))],
        outputs=[TensorInfo(shape=[None, out_dim], dtype="float32")],
        trainable=True,
        arch=getattr(module, "distill_arch", {}).get("name"),
    )
    return ModuleTeacher(module.eval(), info)


# --- training ----------------------------------------------------------------------------------


def _build(
    student: StudentSpec,
    *,
    models: dict[str, ModelFile],
    data: TransferSet,
    out_dim: int,
    teacher: Teacher,
    seed: int,
) -> nn.Module:
    """A fresh student for a stage (an uploaded one is loaded from its file each time)."""
    from core.distill.students import build_student

    model_file = None
    if student.model_id is not None or student.path is not None:
        key = model_key(student)
        if key not in models:
            raise InvalidSpec(f"no model file was given for student '{key}'", field="student")
        model_file = models[key]
    torch.manual_seed(seed)
    hf_file = model_file is not None and model_file.format == "hf"
    hf_teacher = getattr(teacher, "hf", None) is not None  # its students are hf models too
    if student.from_teacher is not None or student.hf_config is not None or hf_file or hf_teacher:
        from core.distill.hf.students import build_hf_student

        return build_hf_student(student, teacher, model_file=model_file, x=data.x_train)  # type: ignore[arg-type]
    vocab = None
    if not data.x_train.is_floating_point() and len(data.x_train):
        top = max(int(data.x_train.max()), int(data.x_val.max()) if len(data.x_val) else 0)
        vocab = top + 1  # token ids of the data's own tokenizer: the embedding must hold them
    return build_student(
        student,
        input_shape=tuple(data.x_train.shape[1:]),
        input_dtype=data.x_train.dtype,
        output_dim=out_dim,
        teacher=teacher,
        model_file=model_file,
        inputs=_stats_sample(data.x_train),
        vocab_size=vocab,
    )


def _stats_sample(x: torch.Tensor) -> torch.Tensor:
    """Up to STATS_ROWS training inputs, drawn the same way every time, for the student's input
    standardisation (the transfer set's statistics, labeled or not)."""
    if len(x) <= STATS_ROWS:
        return x
    rows = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:STATS_ROWS]
    return x[rows.to(x.device)]


def _find_settings(
    spec: JobSpec,
    *,
    teacher: Teacher,
    models: dict[str, ModelFile],
    data: TransferSet,
    out_dim: int,
    n_classes: int | None,
    runs: int,
    started: float,
    report: _Reporter,
    should_stop: StopFn,
) -> tuple[JobSpec, Any]:
    """Resolve the spec's "auto" values that need the data: ``training.tune`` searches (and
    trains the first stage's student), else an "auto" lr is found by short trials; then auto
    epochs are cut, when needed, to fit ``max_minutes``."""
    from core import recipe
    from core.distill import search
    from core.distill.methods import build_method
    from core.distill.trainer import monitored_metric, train

    found = search.Found()
    training = spec.training
    first = spec.chain()[0]
    method_spec = first.distillation or spec.distillation or _default_method(spec.task or "")
    needs_lr = undecided(training.lr)
    if training.tune is None and not needs_lr:
        return spec, found

    def run_trial(
        settings: TrainingSpec,
        overrides: dict[str, float],
        progress: ProgressFn | None,
        stop: StopFn,
    ) -> Any:
        student = _build(
            first.student, models=models, data=data, out_dim=out_dim, teacher=teacher,
            seed=settings.seed,
        )  # fmt: skip
        method = build_method(
            method_spec.model_copy(update=overrides),
            student=student,
            teacher=teacher,
            task=spec.task,
            n_classes=n_classes,
            epochs=int(settings.epochs),
        )
        return train(
            student, method, data, teacher, settings, task=spec.task or "", progress=progress,
            should_stop=stop, label="trial",
        )  # fmt: skip

    report.start("search")
    batch = int(training.batch_size)
    per_epoch = recipe.steps_per_epoch(len(data.x_train), min(batch, len(data.x_train)))
    if training.tune is not None:
        searched = {
            "lr": needs_lr,
            "weight_decay": undecided(training.weight_decay),
            "temperature": undecided(getattr(method_spec, "temperature", None)),
            "alpha": undecided(getattr(method_spec, "alpha", None)),
        }
        left = training.max_minutes * 60 - (time.monotonic() - started)
        budget = TUNE_SHARE * left
        if training.tune.budget_minutes is not None:
            budget = min(budget, training.tune.budget_minutes * 60)
        metric, _ = monitored_metric(spec.task or "", data.x_val, data.y_val, True)
        found.tune = search.tune(
            run_trial, training, searched, metric=metric, log=report.log,
            should_stop=should_stop, budget_seconds=budget,
        )  # fmt: skip
        return search.with_values(spec, found.tune.params), found
    found.lr_search = search.find_lr(
        run_trial, training, per_epoch, log=report.log, should_stop=should_stop
    )
    spec = search.with_values(spec, found.lr_search.params)
    left = TIME_SHARE * training.max_minutes * 60 - (time.monotonic() - started)
    return search.fit_time(spec, found, per_epoch * runs, left, report.log), found


def _tuned_stage(result: Any, *, stages: int, spec: JobSpec, report: _Reporter) -> nn.Module:
    """The best tune trial's student as the first stage: its epochs go into the report."""
    label = f"stage 1/{len(spec.chain())}"
    report.start(label)
    report.log(f"{label}: the best tuning trial's student ({result.epochs_run} epochs)")
    report.keep(result.history)
    report.stage_done(1, stages)
    return result.model.eval()


def _distil_stage(
    stage: StageSpec,
    *,
    index: int,
    stages: int,
    teacher: Teacher,
    spec: JobSpec,
    models: dict[str, ModelFile],
    data: TransferSet,
    out_dim: int,
    n_classes: int | None,
    work_dir: Path,
    report: _Reporter,
    should_stop: StopFn,
) -> nn.Module:
    from core.distill.methods import build_method
    from core.distill.trainer import train

    _check_stop(should_stop)
    method_spec = stage.distillation or spec.distillation
    student = _build(
        stage.student,
        models=models,
        data=data,
        out_dim=out_dim,
        teacher=teacher,
        seed=spec.training.seed + index,
    )
    method = build_method(
        method_spec,
        student=student,
        teacher=teacher,
        task=spec.task,
        n_classes=n_classes,
        epochs=spec.training.epochs,
    )
    label = f"stage {index + 1}/{len(spec.chain())}"
    report.start(label)
    report.log(f"{label}: distilling a {_describe(stage.student)} student ({method_spec.method})")
    result = train(
        student,
        method,
        data,
        teacher,
        spec.training,
        task=spec.task,
        stage=index + 1,
        stages=stages,
        progress=report,
        should_stop=should_stop,
        checkpoint_dir=work_dir / f"stage{index + 1}",
        label=label,
    )
    report.keep(result.history)
    report.stage_done(index + 1, stages)
    return result.model.eval()


def _train_baseline(
    final: StageSpec,
    *,
    stages: int,
    teacher: Teacher,
    spec: JobSpec,
    models: dict[str, ModelFile],
    data: TransferSet,
    out_dim: int,
    n_classes: int | None,
    work_dir: Path,
    report: _Reporter,
    should_stop: StopFn,
) -> nn.Module:
    """The final student's architecture trained on the labels alone, with the same budget."""
    from core.distill.methods import build_method
    from core.distill.trainer import train

    _check_stop(should_stop)
    student = _build(
        final.student,
        models=models,
        data=data,
        out_dim=out_dim,
        teacher=teacher,
        seed=spec.training.seed + len(spec.chain()) - 1,
    )
    method = build_method(
        "baseline",
        student=student,
        teacher=teacher,
        task=spec.task,
        n_classes=n_classes,
        epochs=spec.training.epochs,
    )
    training = _same_step_budget(spec.training, data)
    report.start("baseline")
    report.log(
        "baseline: training the same student on the labels alone for the same number of "
        f"optimizer steps ({training.epochs} epochs over the labeled samples)"
    )
    result = train(
        student,
        method,
        data,
        teacher,
        training,
        task=spec.task,
        stage=stages,
        stages=stages,
        progress=report,
        should_stop=should_stop,
        checkpoint_dir=work_dir / "baseline",
        label="baseline",
    )
    report.keep(result.history)
    report.stage_done(stages, stages)
    return result.model.eval()


def _same_step_budget(training: TrainingSpec, data: TransferSet) -> TrainingSpec:
    """The baseline's training settings: as many optimizer steps as the distilled student got.

    The baseline sees only the labeled samples, so with few labels an epoch is a few steps;
    its epochs (and patience and warmup, which count epochs) are scaled to match.
    """
    y = data.y_train
    labeled = int((y >= 0).sum()) if y is not None and not y.is_floating_point() else len(y)
    batch = training.batch_size
    factor = math.ceil(len(data.x_train) / batch) / max(math.ceil(labeled / batch), 1)
    if factor <= 1:
        return training
    patience = training.early_stopping_patience
    return training.model_copy(
        update={
            "epochs": min(MAX_EPOCHS, round(training.epochs * factor)),
            "early_stopping_patience": None if patience is None else round(patience * factor),
            "warmup_epochs": training.warmup_epochs * factor,
        }
    )


# --- evaluation and compression ----------------------------------------------------------------


def _measure(
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
    from core.distill import evaluate

    model = model.eval()
    outputs = evaluate.predict(model, data.x_val, device=device)
    metrics = {
        **evaluate.quality_metrics(outputs, task=task, y=data.y_val, teacher_outputs=teacher_val),
        **evaluate.size_metrics(model),
    }
    if latency:
        metrics.update(evaluate.latency_metrics(model, data.x_val, device=device))
    return metrics, outputs


def _teacher_metrics(
    teacher: Teacher, data: TransferSet, teacher_val: torch.Tensor, task: str
) -> dict[str, Any]:
    from core.distill import evaluate

    quality = evaluate.quality_metrics(teacher_val, task=task, y=data.y_val, teacher_outputs=None)
    return {**quality, "parameters": int(teacher.parameters), "size_bytes": int(teacher.size_bytes)}


def _timing(
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
    from core.distill import evaluate

    student_device = _module_device(student, device)
    models: dict[str, Any] = {"teacher": teacher, "student": student}
    devices = {"teacher": device, "student": student_device}
    session = _onnx_session(student, data, onnx_file, staging / ".timing.onnx")
    if session is not None:
        models["student_onnx"], devices["student_onnx"] = session, torch.device("cpu")
    if baseline is not None:
        models["baseline"], devices["baseline"] = baseline, _module_device(baseline, device)
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


def _module_device(module: nn.Module, default: torch.device) -> torch.device:
    param = next(iter(module.parameters()), None)
    return param.device if param is not None else default


def _onnx_session(
    student: nn.Module, data: TransferSet, exported: Path | None, scratch: Path
) -> Any:
    """An onnxruntime session of the student (the exported file, or a scratch export that is
    removed at once) on TIMING_THREADS threads; None when the student does not export."""
    import onnxruntime as ort

    from core.distill import export

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


def _compress(
    student: nn.Module,
    measured: tuple[dict[str, Any], torch.Tensor],
    spec: JobSpec,
    data: TransferSet,
    teacher_val: torch.Tensor,
    task: str,
    device: torch.device,
    report: _Reporter,
) -> tuple[nn.Module, tuple[dict[str, Any], torch.Tensor], list[dict[str, Any]]]:
    """Prune, then quantize the student; measure after each step (before = the step before)."""
    from core.distill import compress

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
        after = _measure(student, data, teacher_val, task, device)
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
        after = _measure(student, data, teacher_val, task, where)
        steps.append({"step": "quantize", "mode": mode, "before": measured[0], "after": after[0]})
        measured = after
    return student, measured, steps


def _quantized_device(mode: str, device: torch.device) -> torch.device:
    # int8 kernels run on the CPU; fp16 runs wherever the job runs.
    return device if mode == "fp16" else torch.device("cpu")


# --- export ------------------------------------------------------------------------------------


def _export(
    model: nn.Module,
    formats: list[str],
    data: TransferSet,
    *,
    staging: Path,
    report: _Reporter,
    name: str,
) -> tuple[list[Artifact], dict[str, Any]]:
    """Write each requested format of ``model`` as ``{name}.*`` with kinds ``{name}_*``; return
    the artifacts and the export checks."""
    from core.distill import export

    model = model.cpu().eval()
    if hasattr(model, "tokenizer") and hasattr(model, "run"):  # a Hugging Face model
        from core.distill.hf.export import export_hf_student

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


def _default_method(task: str) -> Any:
    return KDMethod() if task == "classification" else MSEMethod()


def _check_stop(should_stop: StopFn) -> None:
    if should_stop():
        raise Cancelled("the job was cancelled")


def _fits(expected: list[int | None], got: list[int]) -> bool:
    return len(expected) == len(got) and all(
        e is None or e == g for e, g in zip(expected, got, strict=True)
    )


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _describe(student: StudentSpec) -> str:
    if student.preset is not None:
        return student.preset
    if student.shrink is not None:
        return f"shrunk ({student.shrink:g}×)"
    if student.from_teacher is not None:
        small = student.from_teacher.model_dump(exclude_none=True, exclude={"init"})
        return f"smaller copy of the teacher ({small})"
    return "custom"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else ""
