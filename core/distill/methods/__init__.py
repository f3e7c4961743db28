"""Distillation methods: a registry keyed by the spec's ``distillation.method``.

A method is registered with :func:`register_method` and built from its spec with
:func:`build_method`. Specs only name registry keys and numbers; they never import code.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from pydantic import TypeAdapter, ValidationError
from torch import nn

from core.distill.methods.base import DistillMethod
from core.distill.types import Teacher
from core.errors import InvalidSpec

MethodFactory = type[DistillMethod]
_METHODS: dict[str, MethodFactory] = {}


def register_method(name: str | None = None) -> Callable[[MethodFactory], MethodFactory]:
    """Decorator: register a DistillMethod class under ``name`` (default: its ``name``)."""

    def decorate(cls: MethodFactory) -> MethodFactory:
        key = name or getattr(cls, "name", cls.__name__.lower())
        if key in _METHODS:
            warnings.warn(f"method '{key}' registered twice; the later one wins", stacklevel=2)
        _METHODS[key] = cls
        return cls

    return decorate


def method_names() -> list[str]:
    return sorted(_METHODS)


def build_method(
    spec: Any,
    *,
    student: nn.Module,
    teacher: Teacher | None,
    task: str | None,
    n_classes: int | None,
    epochs: int,
) -> DistillMethod:
    """The method a spec names (a DistillationSpec, BaselineSpec, dict or bare name).

    ``student`` becomes part of the method: optimise ``method.parameters()``.
    """
    spec = _parse(spec)
    key = spec.method
    if key not in _METHODS:
        raise InvalidSpec(
            f"unknown distillation method '{key}'; known ones are: {', '.join(method_names())}",
            field="distillation.method",
        )
    method = _METHODS[key](
        spec,
        student=student,
        teacher=teacher,
        task=task or "classification",
        n_classes=n_classes,
        epochs=epochs,
    )
    method.config = spec.model_dump(mode="json")  # what checkpoints and reports record
    return method


def _parse(spec: Any) -> Any:
    if hasattr(spec, "method"):
        return spec
    if isinstance(spec, str):
        spec = {"method": spec}
    if not isinstance(spec, dict) or "method" not in spec:
        raise InvalidSpec("distillation needs a method name", field="distillation.method")
    if spec["method"] not in _METHODS:
        raise InvalidSpec(
            f"unknown distillation method '{spec['method']}'; known ones are: "
            f"{', '.join(method_names())}",
            field="distillation.method",
        )
    try:
        return TypeAdapter(AnyMethodSpec).validate_python(spec)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"][1:])
        raise InvalidSpec(
            f"distillation.{field}: {first['msg']}", field=f"distillation.{field}"
        ) from None


# The built-in methods register themselves on import.
from core.distill.methods import attention, baseline, dkd, fitnet, hidden, kd, mse, rkd  # noqa: E402
from core.distill.methods.baseline import AnyMethodSpec, BaselineSpec  # noqa: E402

__all__ = [
    "AnyMethodSpec",
    "BaselineSpec",
    "DistillMethod",
    "attention",
    "baseline",
    "build_method",
    "dkd",
    "fitnet",
    "hidden",
    "kd",
    "method_names",
    "mse",
    "register_method",
    "rkd",
]
