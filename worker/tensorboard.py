"""Export each epoch's metrics as TensorBoard scalars, when ``DISTILL_TENSORBOARD_DIR`` is set.

Runs in the job's child process (which has torch); one run folder per job,
``<DISTILL_TENSORBOARD_DIR>/<job id>``, one tag per stage and metric (``stage_1_of_2/val_loss``,
``baseline/train_loss``), the epoch as the step. Point ``tensorboard --logdir`` at the folder.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

_NOT_METRICS = {"epoch", "epochs", "stage", "stages", "label", "step", "steps"}


class TensorBoardExporter:
    """Writes ``metrics`` events to a TensorBoard event file."""

    def __init__(self, logdir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self._writer = SummaryWriter(log_dir=str(logdir))

    def record(self, event_type: str, data: dict[str, Any]) -> None:
        if event_type != "metrics" or "epoch" not in data:
            return
        label = data.get("label") or f"stage {data.get('stage', 1)}"
        prefix = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(label).replace("/", " of "))
        for key, value in data.items():
            if key in _NOT_METRICS or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            self._writer.add_scalar(f"{prefix}/{key}", value, global_step=int(data["epoch"]))

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()


def open_exporter(logdir: str | None) -> tuple[TensorBoardExporter | None, str | None]:
    """The exporter for ``logdir`` (None when not set), or a warning saying what is missing."""
    if not logdir:
        return None, None
    try:
        return TensorBoardExporter(Path(logdir)), None
    except ImportError:
        return None, (
            "DISTILL_TENSORBOARD_DIR is set but the tensorboard package is not installed on "
            "this worker (pip install tensorboard); metrics are not exported"
        )
