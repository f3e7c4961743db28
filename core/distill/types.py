"""Types shared by the engine's modules and by whoever runs the engine (CLI, worker)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from core.spec import ModelInfo

if TYPE_CHECKING:  # torch is only needed by whoever builds these; the CLI starts without it
    import torch


@dataclass(frozen=True)
class ModelFile:
    """A model on local disk, as the engine receives it."""

    path: Path
    format: str  # exported_program | hf | onnx | safetensors | torchscript
    arch: str | None = None  # safetensors: built-in architecture name
    arch_config: dict[str, Any] | None = None  # safetensors: its constructor arguments


@dataclass
class TransferSet:
    """Tensors the student learns from. Label ``-1`` marks an unlabeled sample."""

    x_train: torch.Tensor
    y_train: torch.Tensor | None
    x_val: torch.Tensor
    y_val: torch.Tensor | None
    n_classes: int | None = None
    class_names: list[str] | None = None
    text: bool = False  # read from .jsonl text
    prompts: bool = False  # the .jsonl has {"prompt"} lines

    @property
    def has_labels(self) -> bool:
        if self.y_train is None:
            return False
        if not self.y_train.is_floating_point():
            return bool((self.y_train >= 0).any())
        return True


class Teacher(Protocol):
    """A frozen model: inputs in, outputs (and named intermediate features) out."""

    info: ModelInfo
    parameters: int
    size_bytes: int

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Outputs for a batch (logits or log-probabilities for classifiers), no grad."""
        ...

    def features(
        self, x: torch.Tensor, names: list[str]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Outputs plus the named intermediate tensors; InvalidSpec when unavailable."""
        ...

    def to(self, device: torch.device) -> Teacher: ...


EventType = Literal["progress", "metrics", "log"]


@dataclass
class Event:
    """What the engine reports while it runs.

    progress: {stage, stages, epoch, epochs, step, steps, fraction, eta_seconds}
    metrics:  {stage, epoch, step, train_loss, val_loss, val_accuracy | val_mse, …} once per
              epoch (``step``: optimizer steps so far); last, once, the delivered student's
              validation figures ``{label, final: true, val_accuracy, …, verdict}``
    log:      {message}
    """

    type: EventType
    data: dict[str, Any]


ProgressFn = Callable[[Event], None]
StopFn = Callable[[], bool]


@dataclass
class Artifact:
    name: str  # student.onnx, student.pt, student.safetensors, report.json, …
    kind: str  # student_onnx, student_torchscript, student_safetensors, report, …
    path: Path


@dataclass
class JobOutcome:
    """The engine's answer: API.md's `result`, the metric history and the files written."""

    result: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    artifacts: list[Artifact] = field(default_factory=list)
