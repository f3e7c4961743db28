"""Where a causal-LM teacher runs: its own device (``training.teacher_device``) and the dtype
of its weights (``training.teacher_dtype``); its logits come back to the student's device.
"""

from __future__ import annotations

import contextlib
import hashlib

import torch
from torch import Tensor

from core.distill.hf.models import HFModel
from core.errors import InvalidSpec
from core.spec import TrainingSpec

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def teacher_device(training: TrainingSpec, job_device: torch.device) -> torch.device:
    """The device the teacher runs on: ``training.teacher_device``, else the job's; checked
    to exist on this worker and to run ``training.teacher_dtype``."""
    from core.distill.trainer import resolve_device

    device = job_device
    if training.teacher_device is not None:
        device = resolve_device(training.teacher_device, field="training.teacher_device")
    if training.teacher_dtype == "fp16" and device.type != "cuda":
        raise InvalidSpec(
            f"teacher_dtype 'fp16' needs a GPU and the teacher runs on '{device}'; use 'bf16' "
            "or 'fp32', or set training.teacher_device to a GPU",
            field="training.teacher_dtype",
        )
    return device


def place_teacher(teacher: HFModel, training: TrainingSpec, device: torch.device) -> HFModel:
    """The teacher on ``device`` with its weights in ``training.teacher_dtype``."""
    return teacher.to(device=device, dtype=DTYPES[training.teacher_dtype]).eval()


def device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def teacher_logits(teacher: HFModel, x: Tensor, out: torch.device) -> Tensor:
    """The teacher's logits for the packed ``x``, computed on the teacher's device, as float32
    on ``out``. A teacher held in half precision runs outside the student's autocast."""
    return teacher_outputs(teacher, x, out)[0]


def teacher_outputs(
    teacher: HFModel, x: Tensor, out: torch.device, *, hidden: bool = False
) -> tuple[Tensor, dict[str, Tensor]]:
    """:func:`teacher_logits` and, with ``hidden``, the hidden states (float32, on ``out``)."""
    where = device_of(teacher)
    half = next(teacher.parameters()).dtype != torch.float32
    context = torch.autocast(where.type, enabled=False) if half else contextlib.nullcontext()
    with torch.no_grad(), context:
        logits, feats = teacher.run(x.to(where), hidden=hidden)
    return logits.float().to(out), {k: v.float().to(out) for k, v in feats.items()}


def teacher_identity(teacher_sha256: str, training: TrainingSpec) -> str:
    """What the teacher's cached outputs are keyed by: its bytes' sha256 and, when not float32,
    the dtype it ran in (a bf16 teacher's logits are not the float32 teacher's)."""
    if training.teacher_dtype == "fp32":
        return teacher_sha256
    return hashlib.sha256(f"{teacher_sha256}:{training.teacher_dtype}".encode()).hexdigest()
