"""Output matching: the student regresses the teacher's outputs (logits, scores, embeddings);
the usual objective for regression teachers (e.g. Ba & Caruana 2014, "Do Deep Nets Really Need
to be Deep?", which matched logits with L2).

    loss = alpha · (MSE(s, t) + cosine_weight · mean(1 − cos(s, t))) + (1 - alpha) · hard(s, y)

The cosine term (off by default) matches embeddings' directions, what sentence-embedding
students are judged on (Reimers & Gurevych 2020, "Making Monolingual Sentence Embeddings
Multilingual using Knowledge Distillation", arXiv:2004.09813, use the MSE alone).
``hard`` is CE on the labeled samples (classification) or MSE to the targets (regression); a
batch without labels is ``MSE(s, t)``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from core.distill.methods.base import (
    Batch,
    DistillMethod,
    Losses,
    MethodSetup,
    hard_loss,
    require_teacher,
)
from core.distill.methods.registry import register_method
from core.spec import MSEMethod


@register_method("mse")
class MSE(DistillMethod):
    def __init__(
        self,
        spec: MSEMethod,
        setup: MethodSetup,
    ) -> None:
        super().__init__(setup)
        require_teacher(setup.teacher, "mse")
        self.alpha = spec.alpha
        self.cosine_weight = spec.cosine_weight

    def compute(self, out: Tensor, feats: dict[str, Tensor], batch: Batch) -> Losses:
        assert batch.teacher_out is not None
        target = batch.teacher_out.float().reshape(out.shape)
        mse = F.mse_loss(out.float(), target)
        parts = {"mse": mse}
        distill = mse
        if self.cosine_weight:
            cosine = (1 - F.cosine_similarity(out.float().flatten(1), target.flatten(1))).mean()
            parts["cosine"] = cosine
            distill = mse + self.cosine_weight * cosine
        hard = hard_loss(out, batch.y, self.task)
        if hard is None:
            return {"loss": distill, **parts}
        return {"loss": self.alpha * distill + (1 - self.alpha) * hard, **parts, "hard": hard}
