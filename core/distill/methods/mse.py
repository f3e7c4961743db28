"""Output matching: the student regresses the teacher's outputs (logits, scores, embeddings);
the usual objective for regression teachers (e.g. Ba & Caruana 2014, "Do Deep Nets Really Need
to be Deep?", which matched logits with L2).

    loss = alpha · MSE(s, t) + (1 - alpha) · hard(s, y)

``hard`` is CE on the labeled samples (classification) or MSE to the targets (regression); a
batch without labels is ``MSE(s, t)``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from core.distill.methods import register_method
from core.distill.methods.base import DistillMethod, Losses, hard_loss, require_teacher
from core.distill.types import Teacher
from core.spec import MSEMethod


@register_method("mse")
class MSE(DistillMethod):
    def __init__(
        self,
        spec: MSEMethod,
        *,
        student: nn.Module,
        teacher: Teacher | None,
        task: str,
        n_classes: int | None,
        epochs: int,
    ) -> None:
        super().__init__(student, task=task, n_classes=n_classes, epochs=epochs)
        require_teacher(teacher, "mse")
        self.alpha = spec.alpha

    def compute(
        self,
        out: Tensor,
        feats: dict[str, Tensor],
        y: Tensor | None,
        teacher_out: Tensor | None,
        teacher_feats: dict[str, Tensor],
        epoch: int,
    ) -> Losses:
        assert teacher_out is not None
        mse = F.mse_loss(out.float(), teacher_out.float().reshape(out.shape))
        hard = hard_loss(out, y, self.task)
        if hard is None:
            return {"loss": mse, "mse": mse}
        return {"loss": self.alpha * mse + (1 - self.alpha) * hard, "mse": mse, "hard": hard}
