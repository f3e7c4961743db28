"""The no-teacher baseline: the student trained on the labels alone.

    loss = CE(s, y) over the labeled samples (classification) or MSE(s, y) (regression)

It tells what distillation added: a job reports the distilled student next to this one.
"""

from __future__ import annotations

from torch import Tensor

from core.distill.methods.base import Batch, DistillMethod, Losses, MethodSetup, hard_loss
from core.distill.methods.registry import register_method
from core.spec import BaselineSpec


@register_method("baseline")
class Baseline(DistillMethod):
    needs_teacher = False

    def __init__(
        self,
        spec: BaselineSpec,
        setup: MethodSetup,
    ) -> None:
        super().__init__(setup)

    def compute(self, out: Tensor, feats: dict[str, Tensor], batch: Batch) -> Losses:
        hard = hard_loss(out, batch.y, self.task)
        if hard is None:
            # No label in this batch (the trainer keeps labeled rows only, so: validation).
            zero = out.float().sum() * 0.0
            return {"loss": zero, "ce": zero}
        return {"loss": hard, "ce": hard}
