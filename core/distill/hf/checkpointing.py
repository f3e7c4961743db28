"""Gradient checkpointing of an ``hf`` student (``training.gradient_checkpointing``).

Each layer's activations are dropped after the forward pass and recomputed in the backward
pass: the memory of activations falls from every layer's to about one layer's, for roughly a
third more compute. The loss and gradients are the same (dropout's random state is replayed).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from core.distill.hf.models import HFModel
from core.errors import InvalidSpec


@contextlib.contextmanager
def checkpointing(student: HFModel, enabled: bool) -> Iterator[None]:
    """Within the block the student trains with gradient checkpointing and without a KV cache
    (its key/value tensors would only hold memory); both are undone after."""
    if not enabled:
        yield
        return
    model = student.model
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise InvalidSpec(
            f"this student ({type(model).__name__}) does not support gradient checkpointing; "
            "remove training.gradient_checkpointing",
            field="training.gradient_checkpointing",
        )
    use_cache = getattr(model.config, "use_cache", None)
    # Non-reentrant checkpointing: recommended by torch, and needs no input that requires grad.
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x
        model.activation_checkpointing_enable(kwargs)
        disable = model.activation_checkpointing_disable
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        disable = model.gradient_checkpointing_disable
    if use_cache is not None:
        model.config.use_cache = False
    try:
        yield
    finally:
        disable()
        if use_cache is not None:
            model.config.use_cache = use_cache


def is_checkpointing(student: HFModel) -> bool:
    """Whether any layer of the student recomputes its activations in the backward pass."""
    return any(getattr(m, "gradient_checkpointing", False) for m in student.model.modules())
