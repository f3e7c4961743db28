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

from core.distill.methods.base import MethodSetup
from core.distill.methods.hf_layers import MappedLayers
from core.distill.methods.registry import register_method
from core.spec import HiddenMethod, HintPair


def hidden_loss(h_s: Tensor, h_t: Tensor, mask: Tensor) -> Tensor:
    """Σ over valid tokens of ‖h_s − h_t‖², over (valid tokens · hidden size)."""
    m = mask.to(h_s.dtype).unsqueeze(-1)
    sq = (h_s.float() - h_t.float()).pow(2) * m
    return sq.sum() / (m.sum() * h_t.shape[-1]).clamp_min(1)


def projections(n: int, d_s: int, d_t: int) -> nn.ModuleList:
    """``n`` linear maps d_s → d_t, each the identity at start when the sizes agree."""
    layers = nn.ModuleList(nn.Linear(d_s, d_t) for _ in range(n))
    if d_s == d_t:
        with torch.no_grad():
            for p in layers:
                p.weight.copy_(torch.eye(d_t))
                p.bias.zero_()
    return layers


@register_method("hidden")
class Hidden(MappedLayers):
    part = "hidden"
    first = 0
    run_options = {"hidden": True}  # noqa: RUF012 - read only

    def __init__(self, spec: HiddenMethod, setup: MethodSetup) -> None:
        super().__init__(spec, setup)
        self.needs_features = [
            HintPair(teacher=f"hidden_states.{t}", student=f"hidden_states.{s}")
            for s, t in enumerate(self.map)
        ]
        d_s, d_t = self.sizes["hidden_size"], self.teacher_sizes["hidden_size"]
        self.projections = projections(len(self.map), d_s, d_t)

    def layer_term(
        self, feats: dict[str, Tensor], teacher_feats: dict[str, Tensor], mask: Tensor
    ) -> Tensor:
        total = torch.zeros((), dtype=torch.float32, device=mask.device)
        for pair, proj in zip(self.needs_features, self.projections, strict=True):
            h_s = proj(feats[pair.student].float())
            total = total + hidden_loss(h_s, teacher_feats[pair.teacher], mask)
        return total
