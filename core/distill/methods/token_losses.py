"""What the methods of causal language models share: the batch they are given
(:class:`TokenBatch`), their base class (:class:`TokenMethod`), and the pieces of the per-token
losses (``kd``, ``reverse_kl``, ``jsd``): the teacher's next-token distribution, from full
logits or from a top-k cache, and the student's on the same support.

From a top-``k`` cache the support is ``k + 1`` buckets: the teacher's ``k`` most likely tokens
and one bucket for the rest of the vocabulary. The rest's mass is exact at temperature 1
(``1 - Σ top-k``); at another temperature the rest is taken as spread evenly over the other
``V - k`` tokens, which gives its mass at ``T`` (exact when ``T = 1`` or the rest is flat).
A divergence over these buckets is never more than over the whole vocabulary (the buckets
merge tokens): what it misses is the divergence inside the rest, small when the top-k holds
most of the teacher's mass (tests/core/test_causal_losses.py and test_causal.py state it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TINY = 1e-10  # floor of a bucket's probability (a top-k covering the vocabulary leaves 0)


@dataclass
class TeacherTokens:
    """The teacher's next-token distribution at every position of a batch.

    Either ``logits`` (B, L, V), or a top-k: ``values`` (B, L, k) logits, ``indices`` (B, L, k)
    token ids, ``lse`` (B, L) the logsumexp of the full logits (temperature 1).
    """

    logits: Tensor | None = None
    values: Tensor | None = None
    indices: Tensor | None = None
    lse: Tensor | None = None

    def shifted(self) -> TeacherTokens:
        """Without the last position (it predicts past the window)."""
        cut = lambda t: None if t is None else t[:, :-1]  # noqa: E731
        return TeacherTokens(cut(self.logits), cut(self.values), cut(self.indices), cut(self.lse))


def paired_log_probs(
    student_logits: Tensor, teacher: TeacherTokens, temperature: float
) -> tuple[Tensor, Tensor]:
    """Student and teacher log-probabilities at ``temperature`` on a common support (..., S)."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    if teacher.logits is not None:
        return s, F.log_softmax(teacher.logits.float() / temperature, dim=-1)
    assert teacher.values is not None and teacher.indices is not None and teacher.lse is not None
    vocab = student_logits.shape[-1]
    z = teacher.values.float()
    lse = teacher.lse.float().unsqueeze(-1)
    k = z.shape[-1]
    rest_log_mass = _log1mexp(torch.logsumexp(z - lse, -1, keepdim=True))
    others = max(vocab - k, 1)
    rest_logit = lse + rest_log_mass - math.log(others)  # each other token's logit
    top_t = z / temperature
    rest_t = rest_logit / temperature + math.log(others)
    lse_t = torch.logsumexp(torch.cat([top_t, rest_t], -1), -1, keepdim=True)
    t = torch.cat([top_t, rest_t], -1) - lse_t
    s_top = s.gather(-1, teacher.indices.long())
    s_rest = _log1mexp(torch.logsumexp(s_top, -1, keepdim=True))
    return torch.cat([s_top, s_rest], -1), t


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x ≤ 0, floored at log(TINY)."""
    return torch.log((-torch.expm1(x.clamp(max=0))).clamp_min(TINY))


def forward_kl(s_logp: Tensor, t_logp: Tensor) -> Tensor:
    """KL(teacher ‖ student) per position: Σ p_t (log p_t − log p_s)."""
    return (t_logp.exp() * (t_logp - s_logp)).sum(-1)


def reverse_kl(s_logp: Tensor, t_logp: Tensor) -> Tensor:
    """KL(student ‖ teacher) per position: Σ p_s (log p_s − log p_t)."""
    return (s_logp.exp() * (s_logp - t_logp)).sum(-1)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """The mean over the positions the mask keeps (padding and prompt tokens dropped)."""
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp_min(1.0)


def next_token_ce(student_logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Cross-entropy of the next token, averaged over the kept positions."""
    ce = F.cross_entropy(
        student_logits.float().flatten(0, -2), targets.flatten(), reduction="none"
    ).view(targets.shape)
    return masked_mean(ce, mask)


def mixed(divergence: Tensor, ce: Tensor, alpha: float, temperature: float) -> Tensor:
    """α·T²·divergence + (1 − α)·CE (T² keeps the gradients' scale as T changes, Hinton 2015)."""
    return alpha * temperature**2 * divergence + (1 - alpha) * ce


def divergence_and_ce(
    divergence: Callable[[Tensor, Tensor], Tensor],
    student_logits: Tensor,
    teacher: TeacherTokens,
    targets: Tensor,
    mask: Tensor,
    *,
    temperature: float,
    alpha: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """A per-token loss: ``divergence(student, teacher)`` of the log-probabilities at T, mixed
    with next-token CE by α; the loss and its parts (``kl``, ``ce``) at aligned positions."""
    s, t = paired_log_probs(student_logits, teacher, temperature)
    kl = masked_mean(divergence(s, t), mask)
    ce = next_token_ce(student_logits, targets, mask)
    return mixed(kl, ce, alpha, temperature), {"kl": kl.detach(), "ce": ce.detach()}


def divergence_loss(
    divergence: Callable[..., Tensor], knobs: tuple[str, ...] = ()
) -> Callable[..., tuple[Tensor, dict[str, Tensor]]]:
    """The per-token loss that is ``divergence`` mixed with next-token CE (what ``kd``,
    ``reverse_kl`` and ``jsd`` are): ``loss(student_logits, teacher, targets, mask, *,
    temperature, alpha, **options)``, passing on to ``divergence`` the ``knobs`` it takes
    (``jsd``'s ``beta``) and ignoring other options."""

    def loss(
        student_logits: Tensor,
        teacher: TeacherTokens,
        targets: Tensor,
        mask: Tensor,
        *,
        temperature: float,
        alpha: float,
        **options: float,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        chosen = {name: options[name] for name in knobs if name in options}
        return divergence_and_ce(
            partial(divergence, **chosen), student_logits, teacher, targets, mask,
            temperature=temperature, alpha=alpha,
        )  # fmt: skip

    return loss


@dataclass
class TokenBatch:
    """What a causal-LM method is given of one batch. ``x`` is the packed input (B, 2, L):
    token ids and attention mask. The rest is aligned: position t of ``logits`` (the student's,
    B, L-1, V) and of ``teacher`` predicts ``targets[:, t]``, and ``mask`` keeps the positions
    the loss covers (no padding, no prompt). ``hidden`` and ``teacher_hidden`` hold the
    models' hidden states by name (``hidden_states.<i>``, (B, L, d)) for a method that reads
    them."""

    x: Tensor
    logits: Tensor
    targets: Tensor
    mask: Tensor
    teacher: TeacherTokens
    hidden: dict[str, Tensor] = field(default_factory=dict)
    teacher_hidden: dict[str, Tensor] = field(default_factory=dict)


TokenLoss = tuple[Tensor, dict[str, Tensor]]


class TokenMethod(nn.Module):
    """A causal-LM training objective: ``forward(batch)`` gives the loss and its parts (for
    reporting). Its own parameters (projections) are trained with the student's."""

    # Reads both models' hidden states: the teacher then runs on every batch (no logit cache).
    reads_hidden: ClassVar[bool] = False

    def __init__(self, spec: Any) -> None:
        super().__init__()
        self.spec = spec

    def forward(self, batch: TokenBatch) -> TokenLoss:
        raise NotImplementedError


class PerTokenLoss(TokenMethod):
    """A method that is one per-token loss function of the logits (``kd``, ``jsd`` …)."""

    def __init__(self, spec: Any, loss: Callable[..., TokenLoss]) -> None:
        super().__init__(spec)
        self.loss = loss

    def forward(self, batch: TokenBatch) -> TokenLoss:
        knobs = {"temperature": self.spec.temperature, "alpha": self.spec.alpha}
        if hasattr(self.spec, "beta"):
            knobs["beta"] = self.spec.beta
        return self.loss(batch.logits, batch.teacher, batch.targets, batch.mask, **knobs)


def per_token(loss: Callable[..., TokenLoss]) -> Callable[..., TokenMethod]:
    """A registry factory for the method that is ``loss`` per token."""

    def build(spec: Any, *, student: nn.Module, teacher: nn.Module | None) -> TokenMethod:
        return PerTokenLoss(spec, loss)

    return build
