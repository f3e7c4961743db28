"""The base of every distillation method and the loss pieces they share."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.distill.features import check_layer, penultimate_layer, record_features
from core.distill.types import Teacher
from core.errors import InvalidSpec
from core.spec import HintPair

Losses = dict[str, Tensor]


@dataclass
class Batch:
    """What a method is given of one batch besides the student: its inputs and labels (``-1``:
    unlabeled; None: no labels), the teacher's outputs and the features of the teacher layers
    the method names (``needs_features``), and the 0-based index of the running epoch."""

    x: Tensor
    y: Tensor | None = None
    teacher_out: Tensor | None = None
    teacher_feats: dict[str, Tensor] = field(default_factory=dict)
    epoch: int = 0


@dataclass(frozen=True)
class MethodSetup:
    """What a method is built with besides its settings: the student it trains (and owns), the
    frozen teacher (None for the labels-only baseline), the task, the classes and the epochs."""

    student: nn.Module
    teacher: Teacher | None
    task: str
    n_classes: int | None
    epochs: int


class DistillMethod(nn.Module):
    """A training objective: owns the student (and any trainable parts such as projectors).

    ``forward(batch)`` runs the student on ``batch.x`` and returns ``{"loss": total, <part>:
    value, …}``. Parts are for reporting only; only ``loss`` is optimised.
    """

    needs_teacher: bool = True

    def __init__(self, setup: MethodSetup):
        super().__init__()
        self.student = setup.student
        self.task = setup.task
        self.n_classes = setup.n_classes
        self.epochs = setup.epochs
        self.needs_features: list[HintPair] = []

    def forward(self, batch: Batch) -> Losses:
        out, feats = self.run_student(batch.x)
        return self.compute(out, feats, batch)

    def run_student(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The student's outputs and the features this method reads (by student layer)."""
        names = [h.student for h in self.needs_features]
        if not names:
            return self.student(x), {}
        with record_features(self.student, names) as feats:
            out = self.student(x)
        return out, feats

    def compute(self, out: Tensor, feats: dict[str, Tensor], batch: Batch) -> Losses:
        """The losses from the student's outputs and features on ``batch``."""
        raise NotImplementedError

    def output_losses(self, out: Tensor, batch: Batch) -> Losses:
        """Output KD at the spec's ``temperature`` and ``alpha``: what every method "plus
        output KD" starts from."""
        assert batch.teacher_out is not None
        spec = self.spec  # type: ignore[attr-defined]
        return output_kd(
            out, batch.y, batch.teacher_out, task=self.task,
            temperature=spec.temperature, alpha=spec.alpha,
        )  # fmt: skip

    def teacher_layers(self) -> list[str]:
        """Teacher layers whose outputs the trainer must supply."""
        return list(dict.fromkeys(h.teacher for h in self.needs_features))

    def train(self, mode: bool = True) -> DistillMethod:
        self.training = mode
        for child in self.children():
            # An exported program keeps the train/eval behaviour it was exported with.
            with contextlib.suppress(NotImplementedError):
                child.train(mode)
        return self

    def method_state(self) -> dict[str, Tensor]:
        """The method's own state (projectors), without the student's."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("student.")}

    def load_method_state(self, state: dict[str, Tensor]) -> None:
        missing = set(self.method_state()) ^ set(state)
        if missing:
            raise ValueError(f"method state does not match: {sorted(missing)[:5]}")
        self.load_state_dict({**self.student_state(), **state})

    def student_state(self) -> dict[str, Tensor]:
        return {f"student.{k}": v for k, v in self.student.state_dict().items()}

    @torch.no_grad()
    def prepare(self, batch: Batch) -> None:
        """One forward in eval mode so that parts sized from the data (projectors) exist."""
        was_training = self.training
        self.eval()
        try:
            self(batch)
        finally:
            self.train(was_training)


# --- shared loss pieces --------------------------------------------------------------------------


def require_teacher(teacher: Teacher | None, method: str, *, task: str | None = None) -> None:
    """InvalidSpec unless there is a teacher (and, when ``task`` is given, class logits)."""
    if teacher is None:
        raise InvalidSpec(f"method '{method}' needs a teacher", field="distillation.method")
    if task is not None and task != "classification":
        raise InvalidSpec(
            f"method '{method}' needs class logits; use 'mse' for regression",
            field="distillation.method",
        )


def labeled_mask(y: Tensor | None) -> Tensor | None:
    """For class labels, the samples that have one (``y >= 0``); None when none does."""
    if y is None or y.dtype != torch.long or y.dim() != 1:
        return None
    mask = y >= 0
    return mask if bool(mask.any()) else None


def hard_loss(out: Tensor, y: Tensor | None, task: str) -> Tensor | None:
    """CE on the labeled samples (classification) or MSE to targets (regression); None if none."""
    if y is None:
        return None
    if task == "classification":
        mask = labeled_mask(y)
        if mask is None:
            return None
        return F.cross_entropy(out.float()[mask], y[mask])
    return F.mse_loss(out.float(), y.float().reshape(out.shape))


def kd_term(out: Tensor, teacher_out: Tensor, temperature: float) -> Tensor:
    """T² · KL(softmax(t/T) ‖ softmax(s/T)), averaged over the batch (Hinton et al. 2015)."""
    t = temperature
    log_p_s = F.log_softmax(out.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_out.float() / t, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * t * t


def output_term(out: Tensor, teacher_out: Tensor, task: str, temperature: float) -> Tensor:
    """Match the teacher's outputs: KD for classifiers, MSE for regression."""
    if task == "classification":
        return kd_term(out, teacher_out, temperature)
    return F.mse_loss(out.float(), teacher_out.float().reshape(out.shape))


def output_kd(
    out: Tensor,
    y: Tensor | None,
    teacher_out: Tensor,
    *,
    task: str,
    temperature: float,
    alpha: float,
) -> Losses:
    """``alpha · distill + (1 - alpha) · hard`` when the batch has labels, else ``distill``."""
    distill = output_term(out, teacher_out, task, temperature)
    hard = hard_loss(out, y, task)
    if hard is None:
        return {"loss": distill, "kd": distill}
    return {"loss": alpha * distill + (1 - alpha) * hard, "kd": distill, "ce": hard}


def as_vector(f: Tensor) -> Tensor:
    """A feature as one vector per sample: maps and sequences are averaged over positions."""
    f = f.float()
    if f.dim() == 2:
        return f
    if f.dim() == 3:
        return f.mean(1)
    if f.dim() == 4:
        return f.mean((2, 3))
    return f.flatten(1)


def resolve_hints(
    hints: list[HintPair],
    student: nn.Module,
    teacher: Teacher | None,
    method: str,
    *,
    student_default: str | None = None,
) -> list[HintPair]:
    """The hint pairs a method uses: the given ones, checked, or the penultimate features."""
    require_teacher(teacher, method)
    if hints:
        for i, pair in enumerate(hints):
            check_layer(student, pair.student, field=f"distillation.hints.{i}.student")
        return list(hints)
    default = getattr(teacher, "default_feature_layer", None)
    teacher_layer = default() if callable(default) else None
    if not teacher_layer:
        raise InvalidSpec(
            f"method '{method}' needs teacher features and this teacher names no default layer; "
            "give distillation.hints as [{teacher: <layer>, student: <layer>}]",
            field="distillation.hints",
        )
    return [HintPair(teacher=teacher_layer, student=student_default or penultimate_layer(student))]
