"""Intermediate features of a student: forward hooks recorded for one call, then removed.

A layer is named by its module path (``blocks.1``, ``encoder.layers.0``); ``path:input`` names
the *input* of that module instead of its output (``head:input`` is the penultimate vector of a
network whose last layer is ``head``). Hooks live only for the duration of one forward, so the
student stays free of them for export.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from core.errors import InvalidSpec


def split_layer(name: str) -> tuple[str, bool]:
    """``"head:input"`` → ``("head", True)``; ``"blocks.1"`` → ``("blocks.1", False)``."""
    path, sep, kind = name.partition(":")
    if sep and kind != "input":
        raise InvalidSpec(
            f"layer '{name}': only the suffix ':input' is understood after a module path",
            field="distillation.hints",
        )
    return path, bool(sep)


def check_layer(module: nn.Module, name: str, *, field: str = "distillation.hints") -> None:
    """Raise InvalidSpec when ``name`` is not a module path of ``module``."""
    path, _ = split_layer(name)
    try:
        module.get_submodule(path)
    except AttributeError:
        known = [n for n, _ in module.named_modules() if n][:30]
        raise InvalidSpec(
            f"the student has no layer '{path}'; some of its layers: {', '.join(known)}",
            field=field,
        ) from None


def penultimate_layer(student: nn.Module) -> str:
    """The layer whose output is the student's penultimate feature vector.

    Presets declare it in a ``penultimate`` attribute; for other modules it is the input of the
    last ``nn.Linear``.
    """
    declared = getattr(student, "penultimate", None)
    if isinstance(declared, str):
        return declared
    linears = [n for n, m in student.named_modules() if isinstance(m, nn.Linear) and n]
    if not linears:
        raise InvalidSpec(
            "this student has no final Linear layer to take penultimate features from; "
            "name a student layer in distillation.hints",
            field="distillation.hints",
        )
    return f"{linears[-1]}:input"


@contextmanager
def record_features(module: nn.Module, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, every forward of ``module`` fills the dict with the named features.

    After the block, a name that never fired raises InvalidSpec (an exported program has no
    submodules that run, for instance).
    """
    found: dict[str, torch.Tensor] = {}
    handles = []
    for name in dict.fromkeys(names):
        path, want_input = split_layer(name)
        sub = module.get_submodule(path)
        if want_input:

            def pre_hook(_m: nn.Module, args: tuple, _name: str = name) -> None:
                found[_name] = args[0]

            handles.append(sub.register_forward_pre_hook(pre_hook))
        else:

            def hook(_m: nn.Module, _args: tuple, out: object, _name: str = name) -> None:
                found[_name] = out[0] if isinstance(out, tuple) else out  # type: ignore[assignment]

            handles.append(sub.register_forward_hook(hook))
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()
    missing = [n for n in names if n not in found]
    if missing:
        raise InvalidSpec(
            f"student layer(s) {missing} did not run during the forward pass, so their features "
            "can't be read (an exported program has no live submodules); use method 'kd' or "
            "a student built from a preset",
            field="distillation.hints",
        )
