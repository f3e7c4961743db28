"""``kd`` for causal language models: word-level KD (Hinton et al. 2015, arXiv:1503.02531;
Kim & Rush 2016, arXiv:1606.07947), per token.

    L = α · T² · mean_t KL(p_T(·|x<t) ‖ q_T(·|x<t)) + (1 − α) · mean_t −log q(x_t|x<t)

p the teacher's, q the student's next-token distribution at temperature T; the means run over
the tokens the loss covers (padding and prompt tokens masked).
"""

from __future__ import annotations

from core.distill.methods.registry import register_method
from core.distill.methods.token_losses import divergence_loss, forward_kl, per_token

loss = divergence_loss(forward_kl)

register_method("kd", tokens=True)(per_token(loss))
