"""``jsd``: the generalised Jensen–Shannon divergence of GKD (Agarwal et al. 2024,
arXiv:2306.13649), per token, as TRL's ``GKDTrainer`` computes it.

    M = β·p + (1 − β)·q
    JSD_β = β · KL(p ‖ M) + (1 − β) · KL(q ‖ M)      (β = 0: KL(p ‖ q), β = 1: KL(q ‖ p))
    L = α · T² · mean_t JSD_β + (1 − α) · mean_t −log q(x_t|x<t)

p the teacher's, q the student's next-token distribution at temperature T. The end points are
taken as the forward and reverse KL, as TRL does (the mixture alone would vanish there).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from core.distill.methods.registry import register_method
from core.distill.methods.token_losses import (
    divergence_loss,
    forward_kl,
    per_token,
    reverse_kl,
)


def divergence(s_logp: Tensor, t_logp: Tensor, beta: float = 0.5) -> Tensor:
    """JSD_β per position from the two log-probability vectors."""
    if beta <= 0:
        return forward_kl(s_logp, t_logp)
    if beta >= 1:
        return reverse_kl(s_logp, t_logp)
    m = torch.logsumexp(torch.stack([t_logp + math.log(beta), s_logp + math.log(1 - beta)]), 0)
    return beta * forward_kl(m, t_logp) + (1 - beta) * forward_kl(m, s_logp)


loss = divergence_loss(divergence, knobs=("beta",))

register_method("jsd", tokens=True)(per_token(loss))
# gkd: the same loss, on the student's own completions a fraction λ of the time
register_method("gkd", tokens=True)(per_token(loss))
