"""Training a causal-LM student with a method of :mod:`core.distill.methods` (a
:class:`TokenMethod`) over the tokens the data marks as targets.

The teacher's distribution comes from the top-k cache (:mod:`.cache`) or from its forward on
the batch (always, for a method that reads hidden states); the baseline learns the next token
alone (cross-entropy), for the same steps. After every epoch a checkpoint (the trainer's format,
:mod:`core.distill.checkpoints`) holds what a re-run needs to go on from there.
"""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from core.distill.causal.cache import TopKCache
from core.distill.causal.data import TokenRows
from core.distill.causal.generate import OnPolicy
from core.distill.causal.placement import teacher_outputs
from core.distill.checkpoints import (
    checkpoint_path,
    fingerprint,
    load_checkpoint,
    restore_rng,
    rng_state,
    save_checkpoint,
)
from core.distill.hf.models import HFModel
from core.distill.methods.token_losses import (
    TeacherTokens,
    TokenBatch,
    TokenMethod,
    next_token_ce,
)
from core.distill.types import Event, ProgressFn, StopFn
from core.errors import Cancelled
from core.spec import TrainingSpec


def train_student(
    student: HFModel,
    data: TokenRows,
    val: TokenRows,
    *,
    training: TrainingSpec,
    method: TokenMethod | None,
    teacher: HFModel | None,
    cache: TopKCache | None,
    device: torch.device,
    label: str,
    stage: tuple[int, int],
    progress: ProgressFn,
    should_stop: StopFn,
    on_policy: OnPolicy | None = None,
    checkpoint_dir: Path | None = None,
) -> list[dict[str, Any]]:
    """Train ``student`` (and ``method``'s own parameters) in place; the history of its epochs
    (loss, validation perplexity), those restored from a checkpoint included.

    ``method`` None trains on the next token alone (the baseline). ``on_policy(n)`` gives ``n``
    rows of the student's own completions (``gkd``: a batch is one with probability λ). With
    ``checkpoint_dir``, a checkpoint of this same run found there is resumed, and one is
    written after every epoch.
    """
    from core.distill.hf.checkpointing import checkpointing

    with checkpointing(student, training.gradient_checkpointing):
        return _train(
            student, data, val, training=training, method=method, teacher=teacher, cache=cache,
            device=device, label=label, stage=stage, progress=progress, should_stop=should_stop,
            on_policy=on_policy, checkpoint_dir=checkpoint_dir,
        )  # fmt: skip


def _train(
    student: HFModel,
    data: TokenRows,
    val: TokenRows,
    *,
    training: TrainingSpec,
    method: Any | None,
    teacher: HFModel | None,
    cache: TopKCache | None,
    device: torch.device,
    label: str,
    stage: tuple[int, int],
    progress: ProgressFn,
    should_stop: StopFn,
    on_policy: OnPolicy | None,
    checkpoint_dir: Path | None,
) -> list[dict[str, Any]]:
    from core.distill.causal.evaluate import perplexity

    student.to(device).train()
    params = list(student.parameters())
    if method is not None:
        params += list(method.to(device).train().parameters())
    optimizer = torch.optim.AdamW(params, lr=training.lr, weight_decay=training.weight_decay)
    batch = min(training.batch_size, len(data))
    steps_per_epoch = math.ceil(len(data) / batch)
    total = steps_per_epoch * training.epochs
    generator = torch.Generator().manual_seed(training.seed)
    # The batch order and gkd's coin share ``generator``; gkd's prompts have their own.
    generators = {"shuffle": generator}
    if on_policy is not None:
        generators["on_policy"] = on_policy.generator
    lmbda = float(getattr(method.spec, "lmbda", 0.0)) if method is not None else 0.0
    hidden = method is not None and method.reads_hidden
    saved = _Checkpoint(
        checkpoint_path(checkpoint_dir, label, stage[0]) if checkpoint_dir else None,
        _fingerprint(training, method, student, data, val, label),
        student, method, optimizer, generators, progress,
    )  # fmt: skip
    state = saved.restore()
    history: list[dict[str, Any]] = list(state["history"]) if state else []
    step = int(state["step"]) if state else 0
    teacher_seconds = float(state["teacher_seconds"]) if state else 0.0
    done, first_step = (int(state["epoch"]) if state else 0), step
    started = time.monotonic()
    for epoch in range(done + 1, training.epochs + 1):
        order = torch.randperm(len(data), generator=generator)
        totals: dict[str, float] = {}
        for start in range(0, len(data), batch):
            if should_stop():
                raise Cancelled("the job was cancelled")
            rows = order[start : start + batch]
            xb, target = data.x[rows], data.target[rows]
            use_cache = cache
            if on_policy is not None and float(torch.rand((), generator=generator)) < lmbda:
                own = on_policy(len(rows))
                xb, target, use_cache = own.x, own.target, None
                totals["on_policy_fraction"] = totals.get("on_policy_fraction", 0.0) + 1
            xb = xb.to(device)
            mask = target[:, 1:].to(device) & xb[:, 1, 1:].bool()
            targets = xb[:, 0, 1:]
            with _autocast(device):
                logits, feats = student.run(xb, hidden=hidden)
                logits = logits[:, :-1]
                if method is not None:
                    t0 = time.monotonic()
                    tokens, t_feats = _teacher_tokens(
                        teacher, None if hidden else use_cache, rows, xb, device, hidden=hidden
                    )
                    teacher_seconds += time.monotonic() - t0
            if method is None:
                loss = next_token_ce(logits, targets, mask)
                parts = {"ce": loss.detach()}
            else:  # the losses run in float32 (they upcast the logits)
                batch_in = TokenBatch(xb, logits, targets, mask, tokens.shifted(), feats, t_feats)
                loss, parts = method(batch_in)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            totals["train_loss"] = totals.get("train_loss", 0.0) + float(loss.detach())
            for name, value in parts.items():
                totals[name] = totals.get(name, 0.0) + float(value)
        row = {k: round(v / steps_per_epoch, 5) for k, v in totals.items()}
        row.update(
            epoch=epoch,
            step=step,
            val_perplexity=round(perplexity(student, val, device), 4),
            teacher_seconds=round(teacher_seconds, 3),
        )
        student.train()
        history.append(row)
        saved.save(
            epoch=epoch,
            finished=epoch == training.epochs,
            step=step,
            history=history,
            teacher_seconds=teacher_seconds,
        )
        progress(Event("metrics", {**row, "label": label}))
        elapsed = time.monotonic() - started
        progress(
            Event(
                "progress",
                {
                    "stage": stage[0],
                    "stages": stage[1],
                    "fraction": round(step / total, 4),
                    "eta_seconds": round(elapsed / (step - first_step) * (total - step), 1),
                    "label": label,
                },
            )
        )
    return history


class _Checkpoint:
    """One run's checkpoint: the student's weights, the method's own parameters, the
    optimizer's state, the random states of the global and the run's generators, and the
    counters the loop passes (the epoch, the step, the history)."""

    def __init__(
        self,
        path: Path | None,
        spec: str,
        student: HFModel,
        method: TokenMethod | None,
        optimizer: torch.optim.Optimizer,
        generators: dict[str, torch.Generator],
        progress: ProgressFn,
    ) -> None:
        self.path, self.spec, self.progress = path, spec, progress
        self.student, self.method, self.optimizer = student, method, optimizer
        self.generators = generators

    def save(self, **counters: Any) -> None:
        if self.path is None:
            return
        state = {
            "spec": self.spec,
            "student": self.student.state_dict(),
            "method": self.method.state_dict() if self.method is not None else {},
            "optimizer": self.optimizer.state_dict(),
            **rng_state(**self.generators),
            **counters,
        }
        save_checkpoint(self.path, state)

    def restore(self) -> dict[str, Any] | None:
        """Load this run's checkpoint into the models, the optimizer and the generators; the
        checkpoint (None when there is none of this run)."""
        state = load_checkpoint(self.path, self.spec, self._log)
        if state is None:
            return None
        assert self.path is not None
        self.student.load_state_dict(state["student"])
        if self.method is not None:
            self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        restore_rng(state, **self.generators)
        self._log(f"resumed from {self.path.name} after epoch {state['epoch']}")
        return state

    def _log(self, message: str) -> None:
        self.progress(Event("log", {"message": message}))


def _fingerprint(
    training: TrainingSpec,
    method: TokenMethod | None,
    student: HFModel,
    data: TokenRows,
    val: TokenRows,
    label: str,
) -> str:
    """What a checkpoint must match to be resumed: the settings, the method, the student's
    layout and the training rows themselves (seqkd's are the teacher's generations)."""
    shapes = {k: list(v.shape) for k, v in student.state_dict().items()}
    return fingerprint(
        training=training.model_dump(),
        method=method.spec.model_dump() if method is not None else "next_token",
        student=_digest(repr(sorted(shapes.items())).encode()),
        rows=_digest(data.x, data.target),
        n_val=len(val),
        label=label,
    )


def _digest(*parts: bytes | Tensor) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else part.contiguous().numpy().data)
    return h.hexdigest()


def _teacher_tokens(
    teacher: HFModel | None,
    cache: TopKCache | None,
    rows: Tensor,
    xb: Tensor,
    device: torch.device,
    *,
    hidden: bool,
) -> tuple[TeacherTokens, dict[str, Tensor]]:
    """The teacher's next-token distribution (and hidden states) for the batch."""
    if cache is not None:
        return cache.batch(rows, device), {}
    assert teacher is not None
    logits, feats = teacher_outputs(teacher, xb, device, hidden=hidden)
    return TeacherTokens(logits=logits), feats


def _autocast(device: torch.device) -> Any:
    """bf16 autocast on GPUs that support it (the forward passes; the losses stay float32)."""
    enabled = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)
