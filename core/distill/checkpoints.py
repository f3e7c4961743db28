"""Training checkpoints: one file per run (a stage, the baseline), resumed only by the same run.

A checkpoint is a dict of tensors and primitives (read back with ``weights_only=True``: nothing
is unpickled) holding a ``spec`` fingerprint that the resuming run must match, and the random
states that make a resumed run continue where it stopped rather than repeat itself. It is
written to a temporary name and renamed into place, so a reader (the worker uploading it) never
sees half a file.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def checkpoint_path(folder: Path, label: str, stage: int) -> Path:
    """The file of run ``label`` (stage ``stage``) under ``folder``."""
    return folder / f"{_safe_name(label)}-stage{stage}.pt"


def fingerprint(**parts: Any) -> str:
    """What a checkpoint must match to be resumed (the spec, the method, the data's size …)."""
    return json.dumps(parts, sort_keys=True, default=str)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(
    path: Path | None, spec: str, log: Callable[[str], None]
) -> dict[str, Any] | None:
    """The checkpoint at ``path`` when it belongs to the run whose fingerprint is ``spec``."""
    if path is None or not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("spec") != spec:
        log(f"ignoring {path.name}: it belongs to a different run")
        return None
    return state


def rng_state(**generators: torch.Generator) -> dict[str, Any]:
    """The global CPU and CUDA random states and those of ``generators`` (``<name>_rng``)."""
    state: dict[str, Any] = {
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    state.update({f"{name}_rng": g.get_state() for name, g in generators.items()})
    return state


def restore_rng(state: dict[str, Any], **generators: torch.Generator) -> None:
    """Set the random states that :func:`rng_state` saved."""
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    for name, g in generators.items():
        g.set_state(state[f"{name}_rng"])


def _safe_name(label: str) -> str:
    """A label as a file name: ``stage 1/2`` → ``stage_1_2``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "student"


__all__ = [
    "checkpoint_path",
    "fingerprint",
    "load_checkpoint",
    "restore_rng",
    "rng_state",
    "save_checkpoint",
]
