"""Relational knowledge distillation, Park et al. 2019, "Relational Knowledge Distillation"
(CVPR 2019, arXiv:1904.05068), trained jointly with output KD.

On the penultimate embeddings e (one vector per sample) of a batch:

    ψ_D(i, j)    = ‖e_i - e_j‖₂ / μ,  μ the mean distance over pairs i ≠ j
    ψ_A(i, j, k) = ⟨(e_i - e_j)/‖e_i - e_j‖, (e_k - e_j)/‖e_k - e_j‖⟩
    loss = output_kd + distance_weight · Huber(ψ_D^s, ψ_D^t) + angle_weight · Huber(ψ_A^s, ψ_A^t)

Huber is smooth L1 with δ = 1, averaged over all pairs / triplets. The angle term uses at most
the first 64 samples of a batch: its memory grows as N²·d.
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
    as_vector,
    resolve_hints,
)
from core.distill.methods.registry import register_method
from core.spec import RKDMethod

ANGLE_SAMPLES = 64


@register_method("rkd")
class RKD(DistillMethod):
    def __init__(
        self,
        spec: RKDMethod,
        setup: MethodSetup,
    ) -> None:
        super().__init__(setup)
        self.spec = spec
        self.needs_features = resolve_hints([], setup.student, setup.teacher, "rkd")

    def compute(self, out: Tensor, feats: dict[str, Tensor], batch: Batch) -> Losses:
        spec = self.spec
        pair = self.needs_features[0]
        e_s = as_vector(feats[pair.student])
        e_t = as_vector(batch.teacher_feats[pair.teacher])
        losses = self.output_losses(out, batch)
        if len(e_s) < 3:  # no pairs or angles to compare
            zero = e_s.sum() * 0.0
            distance, angle = zero, zero
        else:
            distance = F.smooth_l1_loss(distances(e_s), distances(e_t))
            n = min(len(e_s), ANGLE_SAMPLES)
            angle = F.smooth_l1_loss(angles(e_s[:n]), angles(e_t[:n]))
        losses["distance"] = distance
        losses["angle"] = angle
        losses["loss"] = (
            losses["loss"] + spec.distance_weight * distance + spec.angle_weight * angle
        )
        return losses


def distances(e: Tensor) -> Tensor:
    """Pairwise Euclidean distances (N, N) divided by their mean over i ≠ j."""
    n = len(e)
    sq = e.pow(2).sum(1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp_min(1e-12).sqrt()
    off = ~torch.eye(n, dtype=torch.bool, device=e.device)
    d = d * off
    return d / d[off].mean().clamp_min(1e-12)


def angles(e: Tensor) -> Tensor:
    """Cosines of the angles ∠(e_i, e_j, e_k) for all triplets, flattened (N³,)."""
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
    return torch.bmm(diff, diff.transpose(1, 2)).flatten()
