"""Attention transfer, Zagoruyko & Komodakis 2017, "Paying More Attention to Attention"
(ICLR 2017, arXiv:1612.03928), trained jointly with output KD.

For a feature map f (N, C, H, W) the spatial attention map is

    a(f) = vec(mean_c |f_c|^p) / ‖vec(mean_c |f_c|^p)‖₂

(the student's map resized to the teacher's H×W before normalising), and

    loss = output_kd + beta / 2 · Σ_pairs mean((a(f_s) - a(f_t))²)

the mean running over the batch and the positions, as in the authors' code (beta = 1000).
Without ``hints`` the pair is the teacher's last Conv2d (or its default feature layer) and the
student's last conv block.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from core.distill.methods.base import Batch, DistillMethod, Losses, MethodSetup, resolve_hints
from core.distill.methods.registry import register_method
from core.distill.types import Teacher
from core.errors import InvalidSpec
from core.spec import AttentionMethod, HintPair


@register_method("attention")
def attention_method(spec: AttentionMethod, setup: MethodSetup) -> DistillMethod:
    """Attention transfer; for a Hugging Face student, TinyBERT's attention-distribution KL."""
    from core.distill.methods.hf_layers import is_hf_student

    kind: type[DistillMethod] = Attention
    if is_hf_student(setup.student):
        from core.distill.methods.attention_kl import AttentionKL

        kind = AttentionKL
    return kind(spec, setup)  # type: ignore[call-arg]


class Attention(DistillMethod):
    def __init__(
        self,
        spec: AttentionMethod,
        setup: MethodSetup,
    ) -> None:
        super().__init__(setup)
        self.spec = spec
        default = None
        if not spec.hints:
            layers = getattr(setup.student, "attention_layers", None)
            if not layers:
                raise InvalidSpec(
                    "attention transfer needs a student with convolutional feature maps; use "
                    "a cnn or resnet student, name the layers in distillation.hints, or use "
                    "method 'fitnet'",
                    field="distillation.method",
                )
            default = layers[-1]
            teacher_map = _last_conv(setup.teacher)
            if teacher_map is not None:
                self.needs_features = [HintPair(teacher=teacher_map, student=default)]
                return
        self.needs_features = resolve_hints(
            spec.hints, setup.student, setup.teacher, "attention", student_default=default
        )

    def compute(self, out: Tensor, feats: dict[str, Tensor], batch: Batch) -> Losses:
        spec = self.spec
        losses = self.output_losses(out, batch)
        at = out.new_zeros((), dtype=out.float().dtype)
        for pair in self.needs_features:
            f_s, f_t = feats[pair.student], batch.teacher_feats[pair.teacher]
            for name, f in ((pair.student, f_s), (pair.teacher, f_t)):
                if f.dim() != 4:
                    raise InvalidSpec(
                        f"attention transfer needs feature maps (N, C, H, W) but layer '{name}' "
                        f"gives shape {list(f.shape)}; name convolutional layers in "
                        "distillation.hints or use method 'fitnet'",
                        field="distillation.hints",
                    )
            a_t = attention_map(f_t, spec.p, f_t.shape[-2:])
            a_s = attention_map(f_s, spec.p, f_t.shape[-2:])
            at = at + (a_s - a_t).pow(2).mean()
        losses["attention"] = at
        losses["loss"] = losses["loss"] + spec.beta / 2 * at
        return losses


def attention_map(f: Tensor, p: float, size: tuple[int, int] | object) -> Tensor:
    """(N, C, H, W) → (N, h·w): mean over channels of |f|^p, resized to ``size``, L2-normalised."""
    a = f.float().abs().pow(p).mean(1, keepdim=True)
    if a.shape[-2:] != size:
        a = F.interpolate(a, size=size, mode="bilinear", align_corners=False)  # type: ignore[arg-type]
    return F.normalize(a.flatten(1), dim=1)


def _last_conv(teacher: Teacher | None) -> str | None:
    """The teacher's last Conv2d layer, when the teacher lists its layers' types."""
    layer_types = getattr(teacher, "layer_types", None)
    if not callable(layer_types):
        return None
    convs = [name for name, kind in layer_types().items() if kind.endswith("Conv2d")]
    return convs[-1] if convs else None
