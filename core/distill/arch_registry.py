"""The registry of architectures: name → constructor (students and safetensors models).

Constructors register themselves with :func:`register_architecture`; the built-in ones are in
:mod:`core.distill.students`, and :mod:`core.distill.architectures` is the registry with them.

A built model carries ``distill_arch = {"name": …, "config": {…}}`` so that it can be rebuilt
from a safetensors file plus that JSON.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from torch import nn

from core.errors import InvalidSpec

ArchFactory = Callable[..., nn.Module]
_ARCHITECTURES: dict[str, ArchFactory] = {}


def register_architecture(name: str | None = None) -> Callable[[ArchFactory], ArchFactory]:
    """Decorator: register a constructor under ``name`` (default: its own name)."""

    def decorate(factory: ArchFactory) -> ArchFactory:
        key = name or factory.__name__
        if key in _ARCHITECTURES:
            warnings.warn(
                f"architecture '{key}' registered twice; the later one wins", stacklevel=2
            )
        _ARCHITECTURES[key] = factory
        return factory

    return decorate


def architecture_names() -> list[str]:
    return sorted(_ARCHITECTURES)


def build_architecture(name: str, config: dict[str, Any] | None = None) -> nn.Module:
    """Build a registered architecture and tag it with how to rebuild it."""
    if name not in _ARCHITECTURES:
        raise InvalidSpec(
            f"unknown architecture '{name}'; built-in ones are: {', '.join(architecture_names())}",
            field="arch",
        )
    config = dict(config or {})
    try:
        model = _ARCHITECTURES[name](**config)
    except TypeError as exc:
        raise InvalidSpec(f"architecture '{name}' got a bad config: {exc}", field="arch") from None
    model.distill_arch = {"name": name, "config": config}  # type: ignore[assignment]
    return model
