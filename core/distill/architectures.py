"""The architecture registry with the built-in architectures (the presets) registered."""

from __future__ import annotations

import core.distill.students  # noqa: F401 - registers the presets
from core.distill.arch_registry import (
    architecture_names,
    build_architecture,
    register_architecture,
)

__all__ = ["architecture_names", "build_architecture", "register_architecture"]
