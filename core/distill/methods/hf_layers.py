"""What the layer-mapping methods of Hugging Face models share (``hidden``; ``attention`` on hf
students): the models' sizes, the student-to-teacher layer map, and a method that adds one
term over the mapped layers to output KD."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn

from core.distill.methods.base import Batch, DistillMethod, Losses, MethodSetup, require_teacher
from core.errors import InvalidSpec


def is_hf_student(student: nn.Module) -> bool:
    """Whether the student is a Hugging Face model (hidden states and attention by name)."""
    return hasattr(student, "run") and hasattr(student, "tokenizer")


def hf_sizes(student: nn.Module, teacher: Any, method: str) -> tuple[dict, dict]:
    """The student's and the teacher's configs' sizes; InvalidSpec unless both are hf models."""
    hf = getattr(teacher, "hf", None)
    if not is_hf_student(student) or hf is None:
        raise InvalidSpec(
            f"method '{method}' here maps the layers of a Hugging Face teacher and student; "
            "use it with an hf teacher (or 'fitnet' for other models)",
            field="distillation.method",
        )
    c = student.config  # type: ignore[attr-defined]
    mine = {
        "num_layers": c.num_hidden_layers,
        "hidden_size": c.hidden_size,
        "num_heads": c.num_attention_heads,
    }
    return mine, hf


def layer_map(given: list[int] | None, n_student: int, n_teacher: int, *, first: int) -> list[int]:
    """The teacher layer for each student layer ``first..n_student``: given, or uniform."""
    if given is None:
        return [round(i * n_teacher / n_student) for i in range(first, n_student + 1)]
    want = n_student + 1 - first
    if len(given) != want or any(not first <= g <= n_teacher for g in given):
        what = "embeddings and each layer" if first == 0 else "each layer"
        raise InvalidSpec(
            f"layer_map needs {want} teacher layers ({what} of the student), each in "
            f"{first}..{n_teacher}; got {given}",
            field="distillation.layer_map",
        )
    return list(given)


class MappedLayers(DistillMethod):
    """Output KD plus ``weight ·`` a term over the mapped layers (:meth:`layer_term`) of an hf
    student and teacher. ``first`` is the first student layer mapped (0: the embeddings)."""

    part: ClassVar[str]  # the term's name among the reported losses
    first: ClassVar[int]
    run_options: ClassVar[dict[str, bool]]  # what the student's run() must give

    def __init__(
        self,
        spec: Any,
        setup: MethodSetup,
    ) -> None:
        super().__init__(setup)
        require_teacher(setup.teacher, spec.method)
        self.sizes, self.teacher_sizes = hf_sizes(setup.student, setup.teacher, spec.method)
        self.spec = spec
        n_s, n_t = self.sizes["num_layers"], self.teacher_sizes["num_layers"]
        self.map = layer_map(spec.layer_map, n_s, n_t, first=self.first)

    def run_student(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return self.student.run(x, **self.run_options)  # type: ignore[operator]

    def compute(self, out: Tensor, feats: dict[str, Tensor], batch: Batch) -> Losses:
        losses = self.output_losses(out, batch)
        mask = batch.x[:, 1]  # the tokens the attention mask keeps
        term = self.layer_term(feats, batch.teacher_feats, mask)
        losses[self.part] = term
        losses["loss"] = losses["loss"] + self.weight * term
        return losses

    @property
    def weight(self) -> float:
        return float(getattr(self.spec, f"{self.part}_weight"))

    def layer_term(
        self, feats: dict[str, Tensor], teacher_feats: dict[str, Tensor], mask: Tensor
    ) -> Tensor:
        """The term summed over the mapped layer pairs (``needs_features``)."""
        raise NotImplementedError
