"""The training loop: one loop for every method (it only sees ``method(...)["loss"]``).

Per step: forward, loss, backward, clip, optimizer step, scheduler step, zero_grad. Around
it: device and precision, the teacher-output cache, a checkpoint per epoch (resumable to the
same weights on the CPU), early stopping on the validation metric, cancellation, a time limit
and progress events.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from core.distill.checkpoints import (
    checkpoint_path,
    fingerprint,
    load_checkpoint,
    restore_rng,
    rng_state,
    save_checkpoint,
)
from core.distill.methods.base import Batch, DistillMethod
from core.distill.types import Event, ProgressFn, StopFn, Teacher, TransferSet
from core.errors import (
    Cancelled,
    InvalidSpec,
    JobTimeout,
    OutOfMemory,
    TrainingDiverged,
)
from core.spec import TrainingSpec, concrete_training

CACHE_MEMORY_LIMIT = 1 << 30  # teacher outputs larger than this go to a memory-mapped file
PROGRESS_INTERVAL = 0.5  # seconds between progress events
# Rows per teacher call while filling the cache (how often cancellation is checked); the
# teacher splits them into its own batches (ModuleTeacher: small ones on the CPU).
TEACHER_BATCH = 1024
DIVERGENCE_CHECK_STEPS = 50  # steps between checks (one host sync) that the loss is finite
DEVICE_MEMORY_SHARE = 0.5  # share of a GPU's free memory that resident data and cache may use
SMALL_STEP_WORK = 1 << 24  # parameters × batch below which a CPU step runs on one thread


@dataclass
class TrainResult:
    """The trained student (best weights restored, eval mode) and how training went."""

    student: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best_metric: float | None = None
    metric: str = "val_loss"  # the monitored metric's name
    epochs_run: int = 0
    stopped_early: bool = False

    @property
    def model(self) -> nn.Module:
        return self.student


# --- device and precision ----------------------------------------------------------------------


def resolve_device(name: str, field: str = "training.device") -> torch.device:
    """``auto`` → the GPU when there is one, else the CPU; a missing GPU is InvalidSpec on
    ``field``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        index = int(name.partition(":")[2] or 0)
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            other = "'auto' or 'cpu'" if field == "training.device" else "'cpu'"
            raise InvalidSpec(
                f"{field} is '{name}' but this worker has no such GPU ({count} "
                f"GPU{'' if count == 1 else 's'}); use {other}",
                field=field,
            )
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. ``auto``: bf16 on a GPU that supports it."""
    if precision == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else None
    if precision == "fp16" and device.type != "cuda":
        raise InvalidSpec(
            "precision fp16 needs a GPU; use bf16 or fp32 on the CPU", field="training.precision"
        )
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


# --- teacher outputs ---------------------------------------------------------------------------


class TeacherOutputs:
    """Teacher outputs (and features) for the rows of one input tensor, looked up by index.

    Cached: computed once, kept in memory (on the training device when it has room) or, above
    ``limit`` bytes, in memory-mapped files under ``spill_dir``. Live: the teacher runs on every
    lookup.
    """

    def __init__(
        self,
        teacher: Teacher,
        x: Tensor,
        names: list[str],
        device: torch.device,
        *,
        cache: bool,
        spill_dir: Path | None = None,
        limit: int = CACHE_MEMORY_LIMIT,
        should_stop: StopFn | None = None,
    ) -> None:
        self.teacher, self.x, self.names, self.device = teacher, x, names, device
        self.cached = cache
        self._store: dict[str, Any] = {}
        self._spill: Path | None = None
        # Where lookups want their indices: beside the stored outputs (or the live inputs).
        self._index_device = x.device
        if cache and len(x):
            self._fill(spill_dir, limit, should_stop)

    def _live(self, xb: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        xb = xb.to(self.device, non_blocking=True)
        if self.names:
            return self.teacher.features(xb, self.names)
        return self.teacher.predict(xb), {}

    def _fill(self, spill_dir: Path | None, limit: int, should_stop: StopFn | None) -> None:
        n = len(self.x)
        for start in range(0, n, TEACHER_BATCH):
            if should_stop is not None and should_stop():
                raise Cancelled("the job was cancelled")
            out, feats = self._live(self.x[start : start + TEACHER_BATCH])
            part = {"": out, **feats}
            if not self._store:
                per_row = sum(v[0].numel() * 4 for v in part.values())
                self._allocate(part, n, per_row * n, limit, spill_dir)
            for k, v in part.items():
                rows = self._store[k][start : start + len(v)]
                if self._spill is not None:
                    rows[...] = v.detach().float().cpu().numpy()
                else:
                    rows.copy_(v.detach())

    def _allocate(
        self, first: dict[str, Tensor], n: int, size: int, limit: int, spill_dir: Path | None
    ) -> None:
        if size > limit:
            self._spill = Path(tempfile.mkdtemp(prefix="teacher-cache-", dir=spill_dir))
            self._index_device = torch.device("cpu")
            for i, (k, v) in enumerate(first.items()):
                self._store[k] = np.lib.format.open_memmap(
                    self._spill / f"{i}.npy", mode="w+", dtype=np.float32, shape=(n, *v.shape[1:])
                )
            return
        where = self.device if size <= _device_room(self.device) else torch.device("cpu")
        for k, v in first.items():
            self._store[k] = torch.empty((n, *v.shape[1:]), dtype=torch.float32, device=where)
        self._index_device = self._store[""].device

    def get(self, idx: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Outputs and features for rows ``idx``, on the training device."""
        if idx.device != self._index_device:
            idx = idx.to(self._index_device)
        if not self.cached:
            return self._live(self.x[idx])
        if self._spill is not None:
            rows = idx.numpy()
            found = {
                k: torch.from_numpy(np.ascontiguousarray(v[rows])) for k, v in self._store.items()
            }
        elif len(self._store) == 1:
            out = self._store[""][idx]
            return out.to(self.device, non_blocking=True), {}
        else:
            found = {k: v[idx] for k, v in self._store.items()}
        found = {k: v.to(self.device, non_blocking=True) for k, v in found.items()}
        out = found.pop("")
        return out, found

    def close(self) -> None:
        self._store.clear()
        if self._spill is not None:
            shutil.rmtree(self._spill, ignore_errors=True)


def _device_room(device: torch.device) -> int:
    """Bytes of a GPU's free memory that resident training data and cached outputs may take
    (on the CPU everything is "resident" already: no limit)."""
    if device.type != "cuda":
        return 1 << 62
    free, _total = torch.cuda.mem_get_info(device)
    return int(free * DEVICE_MEMORY_SHARE)


def _resident(t: Tensor | None, device: torch.device) -> Tensor | None:
    """``t`` on ``device`` for the whole run when it fits there, else where it is."""
    if t is None or t.device.type == device.type or t.nbytes > _device_room(device):
        return t
    return t.to(device)


def monitored_metric(
    task: str, x_val: Tensor, y_val: Tensor | None, has_teacher: bool
) -> tuple[str, bool]:
    """The validation metric that picks the best epoch, and whether higher is better."""
    if len(x_val) == 0:
        return "train_loss", False
    if task == "classification":
        if y_val is not None and y_val.dtype == torch.long and bool((y_val >= 0).any()):
            return "val_accuracy", True
        if has_teacher:
            return "val_agreement", True
    return "val_loss", False


# --- the loop ----------------------------------------------------------------------------------


def train(
    student: nn.Module,
    method: DistillMethod,
    data: TransferSet,
    teacher: Teacher | None,
    training: TrainingSpec,
    *,
    task: str,
    stage: int = 1,
    stages: int = 1,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    checkpoint_dir: Path | None = None,
    label: str = "student",
) -> TrainResult:
    """Train ``student`` (owned by ``method``) on ``data``; resume from a checkpoint if present."""
    device = resolve_device(training.device)
    training = concrete_training(training, len(data.x_train))
    try:
        with _checkpointing(student, training.gradient_checkpointing):
            return TrainingRun(
                student, method, data, teacher, training, task, stage, stages, device,
                progress, should_stop, checkpoint_dir, label,
            ).run()  # fmt: skip
    except torch.cuda.OutOfMemoryError:
        raise OutOfMemory(
            f"training ran out of GPU memory on {device}; use a smaller training.batch_size "
            "or a smaller student, precision bf16, or device cpu"
        ) from None


def _checkpointing(student: nn.Module, enabled: bool) -> contextlib.AbstractContextManager[None]:
    """Gradient checkpointing of an ``hf`` student (the spec allows it for those alone)."""
    if not enabled:
        return contextlib.nullcontext()
    from core.distill.hf.checkpointing import checkpointing

    return checkpointing(student, True)  # type: ignore[arg-type]


class TrainingRun:
    """One call of :func:`train`: the data, the optimizer and the loop's state (the best epoch
    so far, early stopping, progress timing), so that the loop reads top to bottom. Built
    right before :meth:`run`; ``max_minutes`` counts from then (the teacher cache included)."""

    def __init__(
        self,
        student: nn.Module,
        method: DistillMethod,
        data: TransferSet,
        teacher: Teacher | None,
        training: TrainingSpec,
        task: str,
        stage: int,
        stages: int,
        device: torch.device,
        progress: ProgressFn | None,
        should_stop: StopFn | None,
        checkpoint_dir: Path | None,
        label: str,
    ) -> None:
        if method.student is not student:
            raise ValueError("train() needs the student that the method was built with")
        if method.needs_teacher and teacher is None:
            raise InvalidSpec("this distillation method needs a teacher", field="teacher")
        self.started = time.monotonic()
        self.student, self.method, self.spec = student, method, training
        self.teacher = teacher.to(device) if teacher is not None else None
        self.task, self.stage, self.stages, self.device = task, stage, stages, device
        self.progress, self.should_stop = progress, should_stop
        self.autocast_dtype = resolve_precision(training.precision, device)
        x, y = _training_rows(data, method, task)
        self.metric, self.maximize = monitored_metric(
            task, data.x_val, data.y_val, teacher is not None
        )
        # On a GPU the data stays there for the whole run when it fits: no copy per step.
        self.x, self.y = _resident(x, device), _resident(y, device)
        self.x_val, self.y_val = _resident(data.x_val, device), _resident(data.y_val, device)
        assert self.x is not None and self.x_val is not None
        self.checkpoint = checkpoint_path(checkpoint_dir, label, stage) if checkpoint_dir else None
        self.spill_dir = checkpoint_dir
        bs = training.batch_size
        n = len(self.x)
        # A trailing batch of one sample is dropped: batch norm can't train on it.
        self.steps_per_epoch = max(1, n // bs + (1 if n % bs > 1 else 0))
        self.total_steps = self.steps_per_epoch * training.epochs
        torch.manual_seed(training.seed)
        self.shuffle = torch.Generator().manual_seed(training.seed)
        method.to(device)
        # The teacher's outputs for the training and validation rows (cached: computed here).
        self.train_teacher: TeacherOutputs | None = None
        self.val_teacher: TeacherOutputs | None = None
        try:
            self._teacher_outputs()
            first = torch.arange(min(2, len(self.x)))
            t_out, t_feats = self._teacher_batch(self.train_teacher, first)
            xb, yb = self._batch(first)
            method.prepare(Batch(xb, yb, t_out, t_feats))  # sizes projectors
            method.to(device)
            self.optimizer = self._optimizer()
        except BaseException:
            self.close()
            raise
        self.clip_params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.scheduler = self._scheduler(self.optimizer)
        # Scales the loss for fp16 only (a no-op otherwise), so the step never branches on it.
        self.scaler = torch.amp.GradScaler(
            device.type, enabled=self.autocast_dtype == torch.float16
        )

        self.history: list[dict[str, Any]] = []
        self.best_metric: float | None = None
        self.best_loss = math.inf
        self.best_epoch = 0
        self.best_state: dict[str, Tensor] | None = None
        self.bad_epochs = 0
        self.finished = False
        self.stopped_early = False
        self.loop_started = 0.0
        self.steps_done = 0  # in this call (a resumed run counts from its checkpoint)
        self.steps_left = 0
        self.last_event = 0.0

    def _teacher_outputs(self) -> None:
        if self.teacher is None:
            return
        names = self.method.teacher_layers()
        if self.method.needs_teacher:
            self.train_teacher = TeacherOutputs(
                self.teacher, self.x, names, self.device,
                cache=self.spec.cache_teacher_outputs, spill_dir=self.spill_dir,
                should_stop=self.should_stop,
            )  # fmt: skip
        if len(self.x_val):
            # Validation inputs are few and seen every epoch: always cached.
            self.val_teacher = TeacherOutputs(
                self.teacher, self.x_val, names if self.method.needs_teacher else [],
                self.device, cache=True, spill_dir=self.spill_dir, should_stop=self.should_stop,
            )  # fmt: skip

    def close(self) -> None:
        """Free the teacher's cached outputs (memory-mapped files included)."""
        for outputs in (self.train_teacher, self.val_teacher):
            if outputs is not None:
                outputs.close()

    def run(self) -> TrainResult:
        try:
            return self._train()
        finally:
            self.close()

    def _teacher_batch(
        self, source: TeacherOutputs | None, idx: Tensor
    ) -> tuple[Tensor | None, dict[str, Tensor]]:
        if source is None:
            return None, {}
        return source.get(idx)

    def _batch(self, idx: Tensor) -> tuple[Tensor, Tensor | None]:
        xb = self.x[idx]
        yb = self.y[idx] if self.y is not None else None
        if xb.device.type != self.device.type:
            xb = xb.to(self.device, non_blocking=True)
            yb = yb.to(self.device, non_blocking=True) if yb is not None else None
        return xb, yb

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _optimizer(self) -> torch.optim.Optimizer:
        params = [p for p in self.method.parameters() if p.requires_grad]
        if not params:
            raise InvalidSpec("the student has no trainable parameters", field="student")
        s = self.spec
        if s.optimizer == "sgd":
            return torch.optim.SGD(
                params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay
            )
        return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)

    def _scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        warmup = round(self.spec.warmup_epochs * self.steps_per_epoch)
        total = self.total_steps

        def factor(step: int) -> float:
            # Linear warmup, then cosine decay to zero at the last step.
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    # --- training --------------------------------------------------------------------------

    def _train(self) -> TrainResult:
        start = self._resume()
        self.loop_started = time.monotonic()
        self.steps_left = (self.spec.epochs - start) * self.steps_per_epoch
        with _cpu_threads(self._step_threads()):
            for epoch in range(start, self.spec.epochs):
                if self.finished:
                    break
                row = self._epoch(epoch)
                self.history.append(row)
                if self.progress is not None:
                    self.progress(Event("metrics", dict(row)))
                self._update_best(epoch, row)
                self.finished = self.stopped_early or epoch + 1 == self.spec.epochs
                self._save(epoch + 1)
        if self.best_state is not None:
            self.student.load_state_dict(self.best_state)
        self.method.eval()
        return TrainResult(
            student=self.student,
            history=self.history,
            best_epoch=self.best_epoch,
            best_metric=self.best_metric,
            metric=self.metric,
            epochs_run=len(self.history),
            stopped_early=self.stopped_early,
        )

    def _epoch(self, epoch: int) -> dict[str, Any]:
        started = time.monotonic()
        self.method.train()
        perm = torch.randperm(len(self.x), generator=self.shuffle)
        if perm.device.type != self.x.device.type:
            perm = perm.to(self.x.device)
        bs = self.spec.batch_size
        teacher, method, optimizer, scaler = (
            self.train_teacher, self.method, self.optimizer, self.scaler,
        )  # fmt: skip
        clip = self.spec.grad_clip
        # Losses stay on the device (no host sync per step); they are checked for being finite
        # every DIVERGENCE_CHECK_STEPS steps and summed once at the end of the epoch.
        records: list[dict[str, Tensor]] = []
        sizes: list[int] = []
        checked = 0
        for i in range(self.steps_per_epoch):
            self._check_limits()
            idx = perm[i * bs : (i + 1) * bs]
            xb, yb = self._batch(idx)
            t_out, t_feats = teacher.get(idx) if teacher is not None else (None, {})
            with self._autocast():
                losses = method(Batch(xb, yb, t_out, t_feats, epoch))
            scaler.scale(losses["loss"]).backward()
            if clip is not None:
                scaler.unscale_(optimizer)  # clip the true gradients
                nn.utils.clip_grad_norm_(self.clip_params, clip)
            scaler.step(optimizer)
            scaler.update()
            self.scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            records.append({k: v.detach() for k, v in losses.items()})
            sizes.append(len(idx))
            self.steps_done += 1
            if i + 1 - checked >= DIVERGENCE_CHECK_STEPS:
                self._check_finite(records, checked, epoch)
                checked = i + 1
            if self.progress is not None:
                self._report_progress(epoch, i + 1)
        self._check_finite(records, checked, epoch)
        # The optimizer steps so far: the x axis on which stages and the baseline compare.
        row: dict[str, Any] = {
            "stage": self.stage,
            "epoch": epoch + 1,
            "step": (epoch + 1) * self.steps_per_epoch,
        }
        sums = _weighted_sums(records, sizes)
        seen = sum(sizes)
        row["train_loss"] = sums.pop("loss") / seen
        row.update({f"train_{k}": v / seen for k, v in sums.items()})
        row.update(self._validate(epoch))
        row["lr"] = self.optimizer.param_groups[0]["lr"]
        row["seconds"] = round(time.monotonic() - started, 3)
        return row

    def _step_threads(self) -> int | None:
        """1 for a small step on the CPU (waking intra-op threads costs more than its work,
        many times more when other processes share the cores), else None (torch's choice)."""
        if self.device.type != "cpu":
            return None
        work = sum(p.numel() for p in self.method.parameters()) * self.spec.batch_size
        return 1 if work < SMALL_STEP_WORK else None

    def _check_finite(self, records: list[dict[str, Tensor]], start: int, epoch: int) -> None:
        """TrainingDiverged naming the first step from ``start`` on whose loss is not finite."""
        if start >= len(records):
            return
        losses = torch.stack([r["loss"].float() for r in records[start:]])
        finite = torch.isfinite(losses)
        if bool(finite.all()):
            return
        first = int((~finite).nonzero()[0, 0])
        step = start + first + 1
        raise TrainingDiverged(
            f"the loss became {float(losses[first])} at epoch {epoch + 1}, step {step}; "
            f"lower training.lr (now {self.spec.lr}) or keep grad_clip on",
            details={"epoch": epoch + 1, "step": step},
        )

    def _check_limits(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise Cancelled("the job was cancelled")
        if time.monotonic() - self.started > self.spec.max_minutes * 60:
            raise JobTimeout(
                f"training ran past training.max_minutes ({self.spec.max_minutes}); "
                "raise it, or use fewer epochs or a smaller student"
            )

    def _report_progress(self, epoch: int, step_in_epoch: int) -> None:
        now = time.monotonic()
        last = step_in_epoch == self.steps_per_epoch and epoch + 1 == self.spec.epochs
        if self.progress is None or (now - self.last_event < PROGRESS_INTERVAL and not last):
            return  # throttled by time alone: no look at the device
        self.last_event = now
        step = epoch * self.steps_per_epoch + step_in_epoch
        rate = (now - self.loop_started) / self.steps_done
        self.progress(
            Event(
                "progress",
                {
                    "stage": self.stage,
                    "stages": self.stages,
                    "epoch": epoch + 1,
                    "epochs": self.spec.epochs,
                    "step": step,
                    "steps": self.total_steps,
                    "fraction": round(step / self.total_steps, 4),
                    "eta_seconds": round(rate * (self.steps_left - self.steps_done), 1),
                },
            )
        )

    # --- validation and early stopping -----------------------------------------------------

    @torch.no_grad()
    def _validate(self, epoch: int) -> dict[str, float]:
        n = len(self.x_val)
        if n == 0:
            return {}
        self.method.eval()
        bs = max(self.spec.batch_size, 256)
        outs, losses_, sizes = [], [], []
        teacher_outs = []
        for start in range(0, n, bs):
            idx = torch.arange(start, min(start + bs, n), device=self.x_val.device)
            xb = self.x_val[idx].to(self.device)
            yb = self.y_val[idx].to(self.device) if self.y_val is not None else None
            t_out, t_feats = self._teacher_batch(self.val_teacher, idx)
            with self._autocast():
                out, feats = self.method.run_student(xb)
                losses = self.method.compute(out, feats, Batch(xb, yb, t_out, t_feats, epoch))
            losses_.append(losses["loss"].float())
            sizes.append(len(idx))
            outs.append(out.float())
            if t_out is not None:
                teacher_outs.append(t_out.float())
        self.method.train()
        out = torch.cat(outs).cpu()
        t_all = torch.cat(teacher_outs).cpu() if teacher_outs else None
        loss_sum = float((torch.stack(losses_).cpu().double() * torch.tensor(sizes)).sum())
        y_val = self.y_val.cpu() if self.y_val is not None else None
        metrics = {"val_loss": loss_sum / n}
        metrics.update(_output_metrics(out, y_val, t_all, self.task))
        return metrics

    def _update_best(self, epoch: int, row: dict[str, Any]) -> None:
        value = row.get(self.metric)
        value = float(value) if value is not None else None
        loss = float(row.get("val_loss", math.inf))
        # An accuracy tie on a small validation split goes to the lower validation loss.
        better = value is not None and (
            self.best_metric is None
            or (value > self.best_metric if self.maximize else value < self.best_metric)
            or (value == self.best_metric and self.maximize and loss < self.best_loss)
        )
        if better:
            self.best_metric, self.best_epoch, self.bad_epochs = value, epoch + 1, 0
            self.best_loss = loss
            self.best_state = {
                k: v.detach().cpu().clone() for k, v in self.student.state_dict().items()
            }
        else:
            self.bad_epochs += 1
        patience = self.spec.early_stopping_patience
        if patience is not None and self.bad_epochs >= patience:
            self.stopped_early = True

    # --- checkpoints -----------------------------------------------------------------------

    def _fingerprint(self) -> str:
        """What a checkpoint must match to be resumed: the spec, the method and the data size."""
        return fingerprint(
            training=self.spec.model_dump(),
            method=getattr(self.method, "config", type(self.method).__name__),
            arch=getattr(self.student, "distill_arch", None),
            task=self.task,
            n_train=len(self.x),
            n_val=len(self.x_val),
        )

    def _save(self, epochs_done: int) -> None:
        if self.checkpoint is None:
            return
        state = {
            "spec": self._fingerprint(),
            "epoch": epochs_done,
            "finished": self.finished,
            "stopped_early": self.stopped_early,
            "student": self.student.state_dict(),
            "method": self.method.method_state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),  # lr_lambdas: [None] for a function
            "scaler": self.scaler.state_dict(),
            "best_metric": self.best_metric,
            "best_loss": self.best_loss,
            "best_epoch": self.best_epoch,
            "best_state": self.best_state,
            "bad_epochs": self.bad_epochs,
            "history": self.history,
            **rng_state(shuffle=self.shuffle),
        }
        save_checkpoint(self.checkpoint, state)

    def _resume(self) -> int:
        """Restore the last checkpoint of this same run; the number of epochs it completed."""
        state = load_checkpoint(self.checkpoint, self._fingerprint(), self._log)
        if state is None:
            return 0
        assert self.checkpoint is not None
        self.student.load_state_dict(state["student"])
        self.method.load_method_state(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.best_metric = state["best_metric"]
        self.best_loss = state.get("best_loss", math.inf)
        self.best_epoch = state["best_epoch"]
        self.best_state = state["best_state"]
        self.bad_epochs = state["bad_epochs"]
        self.history = list(state["history"])
        self.finished = state["finished"]
        self.stopped_early = state["stopped_early"]
        restore_rng(state, shuffle=self.shuffle)
        self._log(f"resumed from {self.checkpoint.name} after epoch {state['epoch']}")
        return int(state["epoch"])

    def _log(self, message: str) -> None:
        if self.progress is not None:
            self.progress(Event("log", {"message": message}))


# --- helpers -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _cpu_threads(threads: int | None) -> Any:
    """torch's intra-op threads set to ``threads`` inside, restored after (None: unchanged)."""
    before = torch.get_num_threads()
    if threads is None or threads >= before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _training_rows(
    data: TransferSet, method: DistillMethod, task: str
) -> tuple[Tensor, Tensor | None]:
    """The training inputs and labels; a labels-only method keeps the labeled rows."""
    x, y = data.x_train, data.y_train
    if method.needs_teacher:
        return x, y
    if y is None:
        keep = None
    elif task == "classification" and y.dtype == torch.long:
        keep = y >= 0
    else:
        keep = torch.ones(len(y), dtype=torch.bool)
    if keep is None or not bool(keep.any()):
        raise InvalidSpec(
            "training on labels alone needs labeled training samples; this dataset has none",
            field="training.baseline",
        )
    return x[keep], y[keep]  # type: ignore[index]


def _weighted_sums(records: list[dict[str, Tensor]], sizes: list[int]) -> dict[str, float]:
    """Per loss part, the sum over steps of its value times the step's batch size (a part a
    step did not report counts as 0 there)."""
    sums: dict[str, float] = {}
    for key in dict.fromkeys(k for r in records for k in r):
        steps = [i for i, r in enumerate(records) if key in r]
        values = torch.stack([records[i][key].float() for i in steps]).cpu().double()
        weights = torch.tensor([sizes[i] for i in steps], dtype=torch.float64)
        sums[key] = float((values * weights).sum())
    return sums


def _output_metrics(
    out: Tensor, y: Tensor | None, teacher_out: Tensor | None, task: str
) -> dict[str, float]:
    """val_accuracy / val_agreement (classification) or val_mse (regression)."""
    metrics: dict[str, float] = {}
    if task == "classification":
        pred = out.argmax(-1)
        if y is not None and y.dtype == torch.long:
            mask = y >= 0
            if bool(mask.any()):
                metrics["val_accuracy"] = float((pred[mask] == y[mask]).float().mean())
        if teacher_out is not None:
            metrics["val_agreement"] = float((pred == teacher_out.argmax(-1)).float().mean())
        return metrics
    target = y if y is not None and y.is_floating_point() else teacher_out
    if target is not None:
        metrics["val_mse"] = float((out - target.float().reshape(out.shape)).pow(2).mean())
    return metrics


__all__ = [
    "TeacherOutputs",
    "TrainResult",
    "monitored_metric",
    "resolve_device",
    "resolve_precision",
    "train",
]
