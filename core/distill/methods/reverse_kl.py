"""``reverse_kl``: per-token reverse KL, mode-seeking (MiniLLM, Gu et al. 2024,
arXiv:2306.08543, here token-level on the data as in Agarwal et al. 2024).

    L = α · T² · mean_t KL(q_T(·|x<t) ‖ p_T(·|x<t)) + (1 − α) · mean_t −log q(x_t|x<t)

The student is penalised for mass where the teacher has little, rather than for missing the
teacher's mass: it concentrates on the teacher's modes.
"""

from __future__ import annotations

from torch import Tensor

from core.distill.methods.token_losses import (
    TeacherTokens,
    masked_mean,
    mixed,
    next_token_ce,
    paired_log_probs,
    reverse_kl,
)


def loss(
    student_logits: Tensor,
    teacher: TeacherTokens,
    targets: Tensor,
    mask: Tensor,
    *,
    temperature: float,
    alpha: float,
    **_: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    s, t = paired_log_probs(student_logits, teacher, temperature)
    kl = masked_mean(reverse_kl(s, t), mask)
    ce = next_token_ce(student_logits, targets, mask)
    return mixed(kl, ce, alpha, temperature), {"kl": kl.detach(), "ce": ce.detach()}
