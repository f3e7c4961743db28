"""FitNets hint learning, Romero et al. 2015, "FitNets: Hints for Thin Deep Nets"
(ICLR 2015, arXiv:1412.6550), trained jointly with output KD.

For each hint pair, a learned regressor r (a 1x1 convolution for feature maps, a linear layer
for vectors) maps the student feature to the teacher feature's shape:

    loss = output_kd + hint_weight · Σ_pairs MSE(r(f_s), f_t)

A map compared with a vector is first averaged over its positions; student maps are resized
to the teacher map's size. Without ``hints`` the pair is the penultimate features.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from core.distill.methods.base import (
    Batch,
    DistillMethod,
    Losses,
    MethodSetup,
    as_vector,
    resolve_hints,
)
from core.distill.methods.registry import register_method
from core.spec import FitNetMethod


@register_method("fitnet")
class FitNet(DistillMethod):
    def __init__(
        self,
        spec: FitNetMethod,
        setup: MethodSetup,
    ) -> None:
        super().__init__(setup)
        self.spec = spec
        self.needs_features = resolve_hints(spec.hints, setup.student, setup.teacher, "fitnet")
        # Sized from the first batch (see DistillMethod.prepare), when both shapes are known.
        self.projectors = nn.ModuleDict()

    def compute(self, out: Tensor, feats: dict[str, Tensor], batch: Batch) -> Losses:
        spec = self.spec
        losses = self.output_losses(out, batch)
        hint = out.new_zeros((), dtype=out.float().dtype)
        for i, pair in enumerate(self.needs_features):
            hint = hint + self._hint(str(i), feats[pair.student], batch.teacher_feats[pair.teacher])
        losses["hint"] = hint
        losses["loss"] = losses["loss"] + spec.hint_weight * hint
        return losses

    def _hint(self, key: str, f_s: Tensor, f_t: Tensor) -> Tensor:
        f_s, f_t = f_s.float(), f_t.float()
        maps = f_s.dim() == 4 and f_t.dim() == 4
        if not maps:
            f_s, f_t = as_vector(f_s), as_vector(f_t)
        if key not in self.projectors:
            c_in, c_out = f_s.shape[1], f_t.shape[1]
            layer = nn.Conv2d(c_in, c_out, 1) if maps else nn.Linear(c_in, c_out)
            self.projectors[key] = layer.to(f_s.device)
        projected = self.projectors[key](f_s)
        if maps and projected.shape[-2:] != f_t.shape[-2:]:
            projected = F.interpolate(
                projected, size=f_t.shape[-2:], mode="bilinear", align_corners=False
            )
        return F.mse_loss(projected, f_t)
