"""``hidden`` for causal language models: per-token KD plus hidden-state distillation through
learned projections, as TinyBERT (Jiao et al. 2020, arXiv:1909.10351) and FitNets (Romero et
al. 2015, arXiv:1412.6550) do for encoders.

    L = kd + hidden_weight · Σ_i  Σ_{valid tokens} ‖W_i h_s^i − h_t^{g(i)}‖² / (n · d_t)

``kd`` is the per-token loss of :mod:`.token_kd` (α · T² · KL + (1 − α) · next-token CE);
student layer ``i`` (0: the embeddings) learns teacher layer ``g(i)`` through the linear map
``W_i`` (hidden_s → hidden_t, the identity at start when the sizes agree), over the ``n``
tokens the attention mask keeps; ``d_t`` is the teacher's hidden size. ``layer_map`` lists
``g`` (embeddings first); the default is uniform, ``g(i) = round(i · N_t / N_s)``. The teacher
runs on every batch (its hidden states are not in the logit cache).
"""

from __future__ import annotations

import torch
from torch import nn

from core.distill.methods.hf_layers import layer_map
from core.distill.methods.hidden import hidden_loss, projections
from core.distill.methods.registry import register_method
from core.distill.methods.token_kd import loss as kd_loss
from core.distill.methods.token_losses import TokenBatch, TokenLoss, TokenMethod
from core.errors import InvalidSpec
from core.spec import HiddenMethod


@register_method("hidden", tokens=True)
class CausalHidden(TokenMethod):
    reads_hidden = True

    def __init__(
        self, spec: HiddenMethod, *, student: nn.Module, teacher: nn.Module | None
    ) -> None:
        super().__init__(spec)
        if teacher is None:
            raise InvalidSpec("method 'hidden' needs a teacher", field="distillation.method")
        mine, theirs = student.config, teacher.config  # type: ignore[union-attr]
        self.map = layer_map(
            spec.layer_map, mine.num_hidden_layers, theirs.num_hidden_layers, first=0
        )
        self.projections = projections(len(self.map), mine.hidden_size, theirs.hidden_size)

    def forward(self, batch: TokenBatch) -> TokenLoss:
        spec = self.spec
        loss, parts = kd_loss(
            batch.logits, batch.teacher, batch.targets, batch.mask,
            temperature=spec.temperature, alpha=spec.alpha,
        )  # fmt: skip
        mask = batch.x[:, 1]  # every token the attention mask keeps, prompts included
        term = torch.zeros((), dtype=torch.float32, device=mask.device)
        for s, (t, proj) in enumerate(zip(self.map, self.projections, strict=True)):
            h_s = proj(batch.hidden[f"hidden_states.{s}"].float())
            term = term + hidden_loss(h_s, batch.teacher_hidden[f"hidden_states.{t}"], mask)
        parts["hidden"] = term.detach()
        return loss + spec.hidden_weight * term, parts
