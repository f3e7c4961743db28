"""A built-in architecture with the weights of a safetensors file: the one loader of safetensors
teachers and uploaded students.

The file is checked as at upload (:func:`core.distill.formats.safetensors_metadata`), read by
safetensors (which holds tensors only: nothing is unpickled), and its tensors must be exactly
the architecture's state dict: a missing or extra key, or a wrong shape, is ModelInvalid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from core.distill.arch_registry import architecture_names, build_architecture
from core.distill.formats import json_object, safetensors_metadata
from core.distill.types import ModelFile
from core.errors import ModelInvalid


@dataclass(frozen=True)
class ArchWeights:
    """The model, on the CPU, and the architecture it was built as."""

    model: nn.Module
    arch: str
    config: dict[str, Any]


def load_arch_weights(file: ModelFile) -> ArchWeights:
    """Build ``file.arch`` (else the file's ``distill_arch`` metadata) with ``file.arch_config``
    (else the file's ``distill_arch_config``, when it names the same architecture) and load the
    file's weights into it."""
    meta = safetensors_metadata(file.path)
    arch = file.arch or meta.get("distill_arch")
    if not arch:
        raise ModelInvalid(
            "a safetensors file holds weights only: give 'arch' naming the built-in "
            f"architecture they fit (one of: {', '.join(architecture_names())}) and its config"
        )
    config = file.arch_config
    if config is None and meta.get("distill_arch_config") and arch == meta.get("distill_arch"):
        config = json_object(meta["distill_arch_config"], "the file's distill_arch_config metadata")
    config = dict(config or {})
    model = build_architecture(arch, config)
    try:
        state = load_file(str(file.path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelInvalid(f"the safetensors file cannot be read: {exc}") from None
    load_weights(model, state, arch, config)
    return ArchWeights(model, arch, config)


def load_weights(
    model: nn.Module, state: dict[str, torch.Tensor], arch: str, config: dict[str, Any]
) -> None:
    """Load ``state`` into ``model`` (built as ``arch`` with ``config``): exactly its keys and
    shapes, else ModelInvalid naming the keys that differ."""
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ModelInvalid(
            f"the weights do not fit architecture '{arch}' with config {config}: "
            f"missing keys {missing[:20]}, unexpected keys {unexpected[:20]}; give the arch "
            "config the weights were trained with",
            details={"missing": missing, "unexpected": unexpected},
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelInvalid(
            f"the weights do not fit architecture '{arch}' with config {config}: {exc}"
        ) from None
