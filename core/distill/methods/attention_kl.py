"""Attention distillation for Hugging Face students: TinyBERT (Jiao et al. 2020,
arXiv:1909.10351) and MiniLM (Wang et al. 2020, arXiv:2002.10957), trained jointly with output
KD. Method key ``attention`` (for other students it is attention transfer,
:mod:`core.distill.methods.attention`).

Student layer ``i`` (1-based) learns the attention distributions of teacher layer ``g(i)``:

    loss = output_kd + attention_weight · Σ_i  1/(H · n) · Σ_{h, valid queries q}
           KL(A_t^{g(i)}[h, q, :] ‖ A_s^i[h, q, :])

with ``n`` the queries the attention mask keeps and ``H`` the heads. When the student has
fewer heads than the teacher, both sides' distributions are averaged over heads first (an
average of distributions is a distribution). ``layer_map`` lists ``g``; the default maps the
student's last layer to the teacher's last, uniformly (``g(i) = round(i · N_t / N_s)``). The
maps need eager attention (``output_attentions``), which hf models here always use.
"""

from __future__ import annotations

import torch
from torch import Tensor

from core.distill.methods.base import MethodSetup
from core.distill.methods.hf_layers import MappedLayers
from core.spec import AttentionMethod, HintPair

EPS = 1e-12


def attention_kl(a_s: Tensor, a_t: Tensor, mask: Tensor) -> Tensor:
    """Mean over heads and valid queries of KL(a_t ‖ a_s) over the keys; (N, H, L, L) maps."""
    if a_s.shape[1] != a_t.shape[1]:
        a_s, a_t = a_s.mean(1, keepdim=True), a_t.mean(1, keepdim=True)
    a_s, a_t = a_s.float(), a_t.float()
    kl = (a_t * (a_t.clamp_min(EPS).log() - a_s.clamp_min(EPS).log())).sum(-1)  # (N, H, L)
    m = mask.to(kl.dtype).unsqueeze(1)  # (N, 1, L): valid queries
    return (kl * m).sum() / (m.sum() * kl.shape[1]).clamp_min(1)


class AttentionKL(MappedLayers):
    part = "attention"
    first = 1
    run_options = {"attentions": True}  # noqa: RUF012 - read only

    def __init__(self, spec: AttentionMethod, setup: MethodSetup) -> None:
        super().__init__(spec, setup)
        self.needs_features = [
            HintPair(teacher=f"attentions.{t - 1}", student=f"attentions.{s}")
            for s, t in enumerate(self.map)
        ]

    def layer_term(
        self, feats: dict[str, Tensor], teacher_feats: dict[str, Tensor], mask: Tensor
    ) -> Tensor:
        total = torch.zeros((), dtype=torch.float32, device=mask.device)
        for pair in self.needs_features:
            total = total + attention_kl(feats[pair.student], teacher_feats[pair.teacher], mask)
        return total
