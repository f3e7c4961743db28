"""``reverse_kl``: per-token reverse KL, mode-seeking (MiniLLM, Gu et al. 2024,
arXiv:2306.08543, here token-level on the data as in Agarwal et al. 2024).

    L = α · T² · mean_t KL(q_T(·|x<t) ‖ p_T(·|x<t)) + (1 − α) · mean_t −log q(x_t|x<t)

The student is penalised for mass where the teacher has little, rather than for missing the
teacher's mass: it concentrates on the teacher's modes.
"""

from __future__ import annotations

from core.distill.methods.registry import register_method
from core.distill.methods.token_losses import divergence_loss, per_token, reverse_kl

loss = divergence_loss(reverse_kl)

register_method("reverse_kl", tokens=True)(per_token(loss))
