"""Distillation methods: one module per method, each registered in :mod:`.registry` by the
spec's ``distillation.method`` when imported. Importing this package registers the built-in
ones.
"""

from __future__ import annotations

from core.distill.methods import (  # noqa: F401 - imported to register
    attention,
    baseline,
    causal_hidden,
    dkd,
    fitnet,
    hidden,
    jsd,
    kd,
    mse,
    reverse_kl,
    rkd,
    token_kd,
)
from core.distill.methods.base import Batch, DistillMethod
from core.distill.methods.registry import (
    build_method,
    build_token_method,
    method_names,
    register_method,
)

__all__ = [
    "Batch",
    "DistillMethod",
    "build_method",
    "build_token_method",
    "method_names",
    "register_method",
]
