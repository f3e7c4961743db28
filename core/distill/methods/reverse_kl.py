"""``reverse_kl``: per-token reverse KL, mode-seeking (MiniLLM, Gu et al. 2024,
arXiv:2306.08543, here token-level on the data as in Agarwal et al. 2024).

    L = α · T² · mean_t KL(q_T(·|x<t) ‖ p_T(·|x<t)) + (1 − α) · mean_t −log q(x_t|x<t)

The student is penalised for mass where the teacher has little, rather than for missing the
teacher's mass: it concentrates on the teacher's modes.
"""

from __future__ import annotations

from torch import Tensor

from core.distill.methods.registry import register_method
from core.distill.methods.token_losses import (
    TeacherTokens,
    divergence_and_ce,
    per_token,
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
    return divergence_and_ce(
        reverse_kl, student_logits, teacher, targets, mask, temperature=temperature, alpha=alpha
    )


register_method("reverse_kl", tokens=True)(per_token(loss))
