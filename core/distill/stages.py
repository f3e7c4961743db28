"""The training runs of a job: the chain of stages, the labels-only baseline and the trials.

Each stage of the chain (teacher → assistant → … → student) distils a fresh student from the
stage before; the baseline trains the last stage's architecture on the labels alone with the
same number of optimizer steps. Every run goes through :func:`train_stage` with the job's
:class:`StageContext`; the lr trials and tune trials of :func:`find_settings` build their
students the same way.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core import recipe
from core.distill import search
from core.distill.hf.students import build_hf_student
from core.distill.methods import build_method
from core.distill.methods.base import DistillMethod
from core.distill.progress import Reporter, check_stop
from core.distill.students import build_student
from core.distill.teacher_io import dtype_name
from core.distill.teachers import ModuleTeacher
from core.distill.trainer import TrainResult, monitored_metric, train
from core.distill.types import ModelFile, ProgressFn, StopFn, Teacher, TransferSet
from core.errors import InvalidSpec
from core.spec import (
    MAX_EPOCHS,
    JobSpec,
    KDMethod,
    ModelInfo,
    ModelRef,
    MSEMethod,
    StudentSpec,
    TensorInfo,
    TrainingSpec,
    undecided,
)

STATS_ROWS = 20_000  # rows that give the student's input statistics
TIME_SHARE = 0.8  # share of max_minutes that auto epochs may fill (the rest: evaluation, export)
TUNE_SHARE = 0.6  # share of what is left of max_minutes that tune may use without budget_minutes


def model_key(ref: ModelRef | StudentSpec) -> str:
    """The key of a model reference in ``run_job``'s ``models`` mapping."""
    key = ref.model_id or ref.path
    if key is None:
        raise InvalidSpec("a model reference needs a model_id or a path", field="teacher")
    return key


def default_method(task: str) -> Any:
    """The method of a stage that names none: kd for a classifier, mse otherwise."""
    return KDMethod() if task == "classification" else MSEMethod()


@dataclass(frozen=True)
class StageContext:
    """What every training run of a job shares."""

    spec: JobSpec  # complete; its "auto" values are decided by find_settings
    models: dict[str, ModelFile]
    data: TransferSet
    teacher: Teacher  # the job's teacher (or ensemble): the baseline's and the trials'
    out_dim: int  # outputs per sample, the teacher's
    n_classes: int | None
    stages: int  # runs that report progress: the chain's stages, then the baseline
    work_dir: Path  # checkpoints, one folder per run
    report: Reporter
    should_stop: StopFn


@dataclass(frozen=True)
class Stage:
    """One training run: a stage of the chain or the labels-only baseline."""

    label: str
    number: int  # its place among the context's stages, from 1
    student: StudentSpec
    teacher: Teacher
    method: Any  # a method spec, or "baseline"
    training: TrainingSpec
    seed: int
    folder: str  # its checkpoints, under the context's work_dir
    announce: str  # the log line that starts it


def chain_stage(ctx: StageContext, index: int, teacher: Teacher) -> Stage:
    """Stage ``index`` of the chain, learning from ``teacher`` (the stage before's student)."""
    stage = ctx.spec.chain()[index]
    method = stage.distillation or ctx.spec.distillation
    label = f"stage {index + 1}/{len(ctx.spec.chain())}"
    return Stage(
        label=label,
        number=index + 1,
        student=stage.student,
        teacher=teacher,
        method=method,
        training=ctx.spec.training,
        seed=ctx.spec.training.seed + index,
        folder=f"stage{index + 1}",
        announce=f"{label}: distilling a {describe(stage.student)} student ({method.method})",
    )


def baseline_stage(ctx: StageContext) -> Stage:
    """The final student's architecture trained on the labels alone, with the same budget."""
    training = same_step_budget(ctx.spec.training, ctx.data)
    return Stage(
        label="baseline",
        number=ctx.stages,
        student=ctx.spec.chain()[-1].student,
        teacher=ctx.teacher,
        method="baseline",
        training=training,
        seed=ctx.spec.training.seed + len(ctx.spec.chain()) - 1,
        folder="baseline",
        announce=(
            "baseline: training the same student on the labels alone for the same number of "
            f"optimizer steps ({training.epochs} epochs over the labeled samples)"
        ),
    )


def train_stage(ctx: StageContext, stage: Stage) -> nn.Module:
    """Train one run from a fresh student (resuming from its checkpoints); eval mode."""
    check_stop(ctx.should_stop)
    student, method = _new_student(
        ctx, stage.student, stage.teacher, stage.method, seed=stage.seed,
        epochs=ctx.spec.training.epochs,
    )  # fmt: skip
    ctx.report.start(stage.label)
    ctx.report.log(stage.announce)
    result = train(
        student,
        method,
        ctx.data,
        stage.teacher,
        stage.training,
        task=ctx.spec.task,
        stage=stage.number,
        stages=ctx.stages,
        progress=ctx.report,
        should_stop=ctx.should_stop,
        checkpoint_dir=ctx.work_dir / stage.folder,
        label=stage.label,
    )
    ctx.report.keep(result.history)
    ctx.report.stage_done(stage.number, ctx.stages)
    return result.model.eval()


def tuned_stage(ctx: StageContext, result: TrainResult) -> nn.Module:
    """The best tune trial's student as the first stage: its epochs go into the report."""
    label = f"stage 1/{len(ctx.spec.chain())}"
    ctx.report.start(label)
    ctx.report.log(f"{label}: the best tuning trial's student ({result.epochs_run} epochs)")
    ctx.report.keep(result.history)
    ctx.report.stage_done(1, ctx.stages)
    return result.model.eval()


def same_step_budget(training: TrainingSpec, data: TransferSet) -> TrainingSpec:
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


def as_teacher(module: nn.Module, data: TransferSet, out_dim: int) -> Teacher:
    """A trained assistant, frozen, as the teacher of the next stage."""
    x = data.x_train
    info = ModelInfo(
        format="module",
        inputs=[TensorInfo(shape=[None, *x.shape[1:]], dtype=dtype_name(x.dtype))],
        outputs=[TensorInfo(shape=[None, out_dim], dtype="float32")],
        trainable=True,
        arch=getattr(module, "distill_arch", {}).get("name"),
    )
    return ModuleTeacher(module.eval(), info)


def describe(student: StudentSpec) -> str:
    """A student spec in a few words, for the log."""
    if student.preset is not None:
        return student.preset
    if student.shrink is not None:
        return f"shrunk ({student.shrink:g}×)"
    if student.from_teacher is not None:
        small = student.from_teacher.model_dump(exclude_none=True, exclude={"init"})
        return f"smaller copy of the teacher ({small})"
    return "custom"


# --- settings that need the data ---------------------------------------------------------------


def find_settings(ctx: StageContext, *, started: float) -> tuple[JobSpec, search.Found]:
    """Resolve the spec's "auto" values that need the data: ``training.tune`` searches (and
    trains the first stage's student), else an "auto" lr is found by short trials; then auto
    epochs are cut, when needed, to fit ``max_minutes`` (``started``: the job's start)."""
    spec, report = ctx.spec, ctx.report
    found = search.Found()
    training = spec.training
    first = spec.chain()[0]
    method_spec = first.distillation or spec.distillation or default_method(spec.task or "")
    needs_lr = undecided(training.lr)
    if training.tune is None and not needs_lr:
        return spec, found

    def run_trial(
        settings: TrainingSpec,
        overrides: dict[str, float],
        progress: ProgressFn | None,
        stop: StopFn,
    ) -> TrainResult:
        student, method = _new_student(
            ctx, first.student, ctx.teacher, method_spec.model_copy(update=overrides),
            seed=settings.seed, epochs=int(settings.epochs),
        )  # fmt: skip
        return train(
            student, method, ctx.data, ctx.teacher, settings, task=spec.task or "",
            progress=progress, should_stop=stop, label="trial",
        )  # fmt: skip

    report.start("search")
    data = ctx.data
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
            should_stop=ctx.should_stop, budget_seconds=budget,
        )  # fmt: skip
        return search.with_values(spec, found.tune.params), found
    found.lr_search = search.find_lr(
        run_trial, training, per_epoch, log=report.log, should_stop=ctx.should_stop
    )
    spec = search.with_values(spec, found.lr_search.params)
    left = TIME_SHARE * training.max_minutes * 60 - (time.monotonic() - started)
    return search.fit_time(spec, found, per_epoch * ctx.stages, left, report.log), found


# --- students ----------------------------------------------------------------------------------


def _new_student(
    ctx: StageContext,
    student: StudentSpec,
    teacher: Teacher,
    method: Any,
    *,
    seed: int,
    epochs: int,
) -> tuple[nn.Module, DistillMethod]:
    """A fresh student for a run and the method that trains it."""
    model = _build(ctx, student, teacher, seed=seed)
    return model, build_method(
        method,
        student=model,
        teacher=teacher,
        task=ctx.spec.task,
        n_classes=ctx.n_classes,
        epochs=epochs,
    )


def _build(ctx: StageContext, student: StudentSpec, teacher: Teacher, *, seed: int) -> nn.Module:
    """A fresh student for a stage (an uploaded one is loaded from its file each time)."""
    data = ctx.data
    model_file = None
    if student.model_id is not None or student.path is not None:
        key = model_key(student)
        if key not in ctx.models:
            raise InvalidSpec(f"no model file was given for student '{key}'", field="student")
        model_file = ctx.models[key]
    torch.manual_seed(seed)
    hf_file = model_file is not None and model_file.format == "hf"
    hf_teacher = getattr(teacher, "hf", None) is not None  # its students are hf models too
    if student.from_teacher is not None or student.hf_config is not None or hf_file or hf_teacher:
        return build_hf_student(student, teacher, model_file=model_file, x=data.x_train)  # type: ignore[arg-type]
    vocab = None
    if not data.x_train.is_floating_point() and len(data.x_train):
        top = max(int(data.x_train.max()), int(data.x_val.max()) if len(data.x_val) else 0)
        vocab = top + 1  # token ids of the data's own tokenizer: the embedding must hold them
    return build_student(
        student,
        input_shape=tuple(data.x_train.shape[1:]),
        input_dtype=data.x_train.dtype,
        output_dim=ctx.out_dim,
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
