"""Knowledge distillation, Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural
Network" (arXiv:1503.02531).

    loss = alpha · T² · KL(softmax(t / T) ‖ softmax(s / T)) + (1 - alpha) · CE(s, y)

KL is averaged over the batch (``reduction="batchmean"``); T² keeps the gradient scale
independent of T. CE covers the labeled samples of the batch (label -1 is unlabeled); a batch
without labels is pure distillation: ``T² · KL``.
"""

from __future__ import annotations

from torch import Tensor

from core.distill.methods.base import Batch, DistillMethod, Losses, MethodSetup, require_teacher
from core.distill.methods.registry import register_method
from core.spec import KDMethod


@register_method("kd")
class KD(DistillMethod):
    def __init__(
        self,
        spec: KDMethod,
        setup: MethodSetup,
    ) -> None:
        super().__init__(setup)
        require_teacher(setup.teacher, "kd", task=setup.task)
        self.spec = spec

    def compute(self, out: Tensor, feats: dict[str, Tensor], batch: Batch) -> Losses:
        return self.output_losses(out, batch)
