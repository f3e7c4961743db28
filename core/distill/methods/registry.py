"""The registry of distillation methods, keyed by the spec's ``distillation.method``.

A method registers itself with :func:`register_method` when its module is imported (the
built-in ones by ``core.distill.methods``) and is built from its spec with :func:`build_method`
(classifiers, regressors and encoders: :mod:`core.distill.trainer`) or
:func:`build_token_method` (causal language models: :mod:`core.distill.causal.train`). Specs
only name registry keys and numbers; they never import code.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from pydantic import TypeAdapter, ValidationError
from torch import nn

from core.distill.methods.base import MethodSetup
from core.errors import InvalidSpec
from core.spec import MethodSpec

Factory = Callable[..., Any]
# (name, tokens): a name may have one method for samples and one for causal LMs' tokens.
_METHODS: dict[tuple[str, bool], Factory] = {}


def register_method(name: str | None = None, *, tokens: bool = False) -> Callable[[Factory], Any]:
    """Decorator: register a method class or factory under ``name`` (default: its ``name``);
    ``tokens`` marks the per-token method of causal language models."""

    def decorate(factory: Factory) -> Factory:
        key = (name or getattr(factory, "name", factory.__name__.lower()), tokens)
        if key in _METHODS:
            warnings.warn(f"method '{key[0]}' registered twice; the later one wins", stacklevel=2)
        _METHODS[key] = factory
        return factory

    return decorate


def method_names(*, tokens: bool = False) -> list[str]:
    """The registered methods (for samples, or for causal LMs' tokens)."""
    return sorted(name for name, per_token in _METHODS if per_token == tokens)


def build_method(
    spec: Any,
    *,
    student: nn.Module,
    teacher: Any,
    task: str | None,
    n_classes: int | None,
    epochs: int,
) -> Any:
    """The method a spec names (a method spec, dict or bare name), as a DistillMethod.

    ``student`` becomes part of the method: optimise ``method.parameters()``.
    """
    spec = parse_method(spec)
    setup = MethodSetup(student, teacher, task or "classification", n_classes, epochs)
    method = _factory(spec.method, tokens=False)(spec, setup)
    method.config = spec.model_dump(mode="json")  # what checkpoints and reports record
    return method


def build_token_method(spec: Any, *, student: nn.Module, teacher: nn.Module | None) -> Any:
    """The per-token method of a causal LM that a spec names, as a TokenMethod; its own
    parameters (projections) are trained with the student's."""
    spec = parse_method(spec)
    return _factory(spec.method, tokens=True)(spec, student=student, teacher=teacher)


def parse_method(spec: Any) -> Any:
    """A method spec from a spec, a dict or a bare name; InvalidSpec naming the field."""
    if hasattr(spec, "method"):
        return spec
    if isinstance(spec, str):
        spec = {"method": spec}
    if not isinstance(spec, dict) or "method" not in spec:
        raise InvalidSpec("distillation needs a method name", field="distillation.method")
    if spec["method"] not in {name for name, _ in _METHODS}:
        raise _unknown(spec["method"], tokens=False)
    try:
        return TypeAdapter(MethodSpec).validate_python(spec)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"][1:])
        raise InvalidSpec(
            f"distillation.{field}: {first['msg']}", field=f"distillation.{field}"
        ) from None


def _factory(name: str, *, tokens: bool) -> Factory:
    if (name, tokens) not in _METHODS:
        raise _unknown(name, tokens=tokens)
    return _METHODS[(name, tokens)]


def _unknown(name: str, *, tokens: bool) -> InvalidSpec:
    what = f"unknown distillation method '{name}'"
    if tokens:
        what = f"distillation method '{name}' has no per-token form for causal language models"
    return InvalidSpec(
        f"{what}; known ones are: {', '.join(method_names(tokens=tokens))}",
        field="distillation.method",
    )
