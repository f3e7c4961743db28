"""Hidden-state distillation for Hugging Face students: TinyBERT (Jiao et al. 2020, "TinyBERT:
Distilling BERT for Natural Language Understanding", arXiv:1909.10351) and FitNets (Romero et
al. 2015, arXiv:1412.6550), trained jointly with output KD.

Student layer ``i`` (0 is the embedding layer's output) learns teacher layer ``g(i)`` through a
learned linear projection ``W_i`` (hidden_s → hidden_t; the identity at start when the sizes
agree):

    loss = output_kd + hidden_weight · Σ_i  Σ_{valid tokens} ‖W_i h_s^i − h_t^{g(i)}‖² / (n · d_t)

with ``n`` the number of tokens the attention mask keeps and ``d_t`` the teacher's hidden size.
``layer_map`` gives ``g`` as a list (one teacher layer per student layer, embeddings first);
the default is TinyBERT's uniform map ``g(i) = round(i · N_t / N_s)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from core.distill.methods import register_method
from core.distill.methods.base import DistillMethod, Losses, output_kd, require_teacher
from core.distill.types import Teacher
from core.errors import InvalidSpec
from core.spec import HiddenMethod, HintPair


def is_hf_student(student: nn.Module) -> bool:
    """Whether the student is a Hugging Face model (hidden states and attention by name)."""
    return hasattr(student, "run") and hasattr(student, "tokenizer")


def hf_sizes(student: nn.Module, teacher: Teacher | None, method: str) -> tuple[dict, dict]:
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


def hidden_loss(h_s: Tensor, h_t: Tensor, mask: Tensor) -> Tensor:
    """Σ over valid tokens of ‖h_s − h_t‖², over (valid tokens · hidden size)."""
    m = mask.to(h_s.dtype).unsqueeze(-1)
    sq = (h_s.float() - h_t.float()).pow(2) * m
    return sq.sum() / (m.sum() * h_t.shape[-1]).clamp_min(1)


@register_method("hidden")
class Hidden(DistillMethod):
    def __init__(
        self,
        spec: HiddenMethod,
        *,
        student: nn.Module,
        teacher: Teacher | None,
        task: str,
        n_classes: int | None,
        epochs: int,
    ) -> None:
        super().__init__(student, task=task, n_classes=n_classes, epochs=epochs)
        require_teacher(teacher, "hidden")
        mine, theirs = hf_sizes(student, teacher, "hidden")
        self.spec = spec
        self.map = layer_map(spec.layer_map, mine["num_layers"], theirs["num_layers"], first=0)
        self.needs_features = [
            HintPair(teacher=f"hidden_states.{t}", student=f"hidden_states.{s}")
            for s, t in enumerate(self.map)
        ]
        d_s, d_t = mine["hidden_size"], theirs["hidden_size"]
        self.projections = nn.ModuleList(nn.Linear(d_s, d_t) for _ in self.map)
        if d_s == d_t:
            with torch.no_grad():
                for p in self.projections:
                    p.weight.copy_(torch.eye(d_t))
                    p.bias.zero_()
        self._mask: Tensor | None = None

    def run_student(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        self._mask = x[:, 1]
        return self.student.run(x, hidden=True)  # type: ignore[operator]

    def compute(
        self,
        out: Tensor,
        feats: dict[str, Tensor],
        y: Tensor | None,
        teacher_out: Tensor | None,
        teacher_feats: dict[str, Tensor],
        epoch: int,
    ) -> Losses:
        assert teacher_out is not None and self._mask is not None
        spec = self.spec
        losses = output_kd(
            out, y, teacher_out, task=self.task, temperature=spec.temperature, alpha=spec.alpha
        )
        total = out.new_zeros((), dtype=torch.float32)
        for pair, proj in zip(self.needs_features, self.projections, strict=True):
            h_s = proj(feats[pair.student].float())
            total = total + hidden_loss(h_s, teacher_feats[pair.teacher], self._mask)
        losses["hidden"] = total
        losses["loss"] = losses["loss"] + spec.hidden_weight * total
        return losses
