"""Decoupled knowledge distillation, Zhao et al. 2022, "Decoupled Knowledge Distillation"
(CVPR 2022, arXiv:2203.08679).

With g the target class, b = [p_g, 1 - p_g] the binary target/non-target probabilities and
p̂ the probabilities over the non-target classes only (all at temperature T):

    TCKD = T² · KL(b_t ‖ b_s)        NCKD = T² · KL(p̂_t ‖ p̂_s)
    loss = ce_weight · CE(s, y) + w(epoch) · (tckd_weight · TCKD + nckd_weight · NCKD)

w(epoch) = min((epoch + 1) / warmup_epochs, 1) ramps the distillation terms in linearly. The
target class is the label where there is one and the teacher's top class otherwise (so DKD also
works on unlabeled transfer data); CE covers the labeled samples only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from core.distill.methods.base import (
    Batch,
    DistillMethod,
    Losses,
    MethodSetup,
    hard_loss,
    labeled_mask,
    require_teacher,
)
from core.distill.methods.registry import register_method
from core.spec import DKDMethod

_MASKED = 1000.0  # subtracted from the target logit to leave it out of the non-target softmax


@register_method("dkd")
class DKD(DistillMethod):
    def __init__(
        self,
        spec: DKDMethod,
        setup: MethodSetup,
    ) -> None:
        super().__init__(setup)
        require_teacher(setup.teacher, "dkd", task=setup.task)
        self.spec = spec

    def compute(self, out: Tensor, feats: dict[str, Tensor], batch: Batch) -> Losses:
        assert batch.teacher_out is not None
        spec = self.spec
        s, t = out.float(), batch.teacher_out.float()
        target = t.argmax(-1)
        mask = labeled_mask(batch.y)
        if mask is not None and batch.y is not None:
            target = torch.where(mask, batch.y, target)
        tckd, nckd = dkd_terms(s, t, target, spec.temperature)
        warm = min((batch.epoch + 1) / spec.warmup_epochs, 1.0) if spec.warmup_epochs else 1.0
        distill = warm * (spec.tckd_weight * tckd + spec.nckd_weight * nckd)
        losses: Losses = {"tckd": tckd, "nckd": nckd}
        ce = hard_loss(s, batch.y, self.task)
        if ce is None:
            losses["loss"] = distill
        else:
            losses["loss"] = spec.ce_weight * ce + distill
            losses["ce"] = ce
        return losses


def dkd_terms(s: Tensor, t: Tensor, target: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """(TCKD, NCKD), each T²-scaled and averaged over the batch."""
    gt = F.one_hot(target, s.shape[-1]).to(s.dtype)
    p_s = F.softmax(s / temperature, -1)
    p_t = F.softmax(t / temperature, -1)
    b_s = torch.stack([(p_s * gt).sum(-1), (p_s * (1 - gt)).sum(-1)], -1)
    b_t = torch.stack([(p_t * gt).sum(-1), (p_t * (1 - gt)).sum(-1)], -1)
    scale = temperature**2
    tckd = F.kl_div(b_s.clamp_min(1e-12).log(), b_t, reduction="batchmean") * scale
    log_q_s = F.log_softmax(s / temperature - _MASKED * gt, -1)
    q_t = F.softmax(t / temperature - _MASKED * gt, -1)
    nckd = F.kl_div(log_q_s, q_t, reduction="batchmean") * scale
    return tckd, nckd
