"""Training a causal-LM student with a method of :mod:`core.distill.methods` (a
:class:`TokenMethod`) over the tokens the data marks as targets.

The teacher's distribution comes from the top-k cache (:mod:`.cache`) or from its forward on
the batch (always, for a method that reads hidden states); the baseline learns the next token
alone (cross-entropy), for the same steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from core.distill.causal.cache import TopKCache
from core.distill.causal.data import TokenRows
from core.distill.causal.placement import teacher_outputs
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
    on_policy: Callable[[int], TokenRows] | None = None,
) -> list[dict[str, Any]]:
    """Train ``student`` (and ``method``'s own parameters) in place; the history of its epochs
    (loss, validation perplexity).

    ``method`` None trains on the next token alone (the baseline). ``on_policy(n)`` gives ``n``
    rows of the student's own completions (``gkd``: a batch is one with probability λ).
    """
    from core.distill.hf.checkpointing import checkpointing

    with checkpointing(student, training.gradient_checkpointing):
        return _train(
            student, data, val, training=training, method=method, teacher=teacher, cache=cache,
            device=device, label=label, stage=stage, progress=progress, should_stop=should_stop,
            on_policy=on_policy,
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
    on_policy: Callable[[int], TokenRows] | None,
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
    history: list[dict[str, Any]] = []
    lmbda = float(getattr(method.spec, "lmbda", 0.0)) if method is not None else 0.0
    hidden = method is not None and method.reads_hidden
    teacher_seconds = 0.0
    started = time.monotonic()
    step = 0
    for epoch in range(1, training.epochs + 1):
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
        progress(Event("metrics", {**row, "label": label}))
        elapsed = time.monotonic() - started
        progress(
            Event(
                "progress",
                {
                    "stage": stage[0],
                    "stages": stage[1],
                    "fraction": round(step / total, 4),
                    "eta_seconds": round(elapsed / step * (total - step), 1),
                    "label": label,
                },
            )
        )
    return history


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
