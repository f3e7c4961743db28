"""``kd`` for causal language models: word-level KD (Hinton et al. 2015, arXiv:1503.02531;
Kim & Rush 2016, arXiv:1606.07947), per token.

    L = α · T² · mean_t KL(p_T(·|x<t) ‖ q_T(·|x<t)) + (1 − α) · mean_t −log q(x_t|x<t)

p the teacher's, q the student's next-token distribution at temperature T; the means run over
the tokens the loss covers (padding and prompt tokens masked).
"""

from __future__ import annotations

from torch import Tensor

from core.distill.methods.registry import register_method
from core.distill.methods.token_losses import (
    TeacherTokens,
    divergence_and_ce,
    forward_kl,
    per_token,
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
    """The loss and its parts (``kl``, ``ce``) for aligned (already shifted) positions."""
    return divergence_and_ce(
        forward_kl, student_logits, teacher, targets, mask, temperature=temperature, alpha=alpha
    )


register_method("kd", tokens=True)(per_token(loss))
