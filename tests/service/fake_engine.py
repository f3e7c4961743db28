"""A stand-in engine for runner tests: behaves as the job's ``name`` says, in a few seconds.

It has the signature of ``core.distill.pipeline.run_job`` and imports no torch, so the runner's
process handling is tested quickly and without depending on training.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from core.errors import Cancelled, TrainingDiverged


class _Outcome:
    def __init__(self, result: dict[str, Any], artifacts: list[Any]) -> None:
        self.result, self.history, self.artifacts = result, [], artifacts


class _Artifact:
    def __init__(self, name: str, kind: str, path: Path) -> None:
        self.name, self.kind, self.path = name, kind, path


class _Event:
    def __init__(self, type: str, data: dict[str, Any]) -> None:
        self.type, self.data = type, data


def run_job(spec, *, models, dataset, dataset_options, out_dir, work_dir, progress, should_stop):
    mode = spec.name
    checkpoint = Path(work_dir) / "stage1" / "last.pt"
    resumed = checkpoint.read_text() if checkpoint.exists() else None
    epochs = 3
    for epoch in range(1, epochs + 1):
        for step in range(5):
            progress(_Event("progress", {"epoch": epoch, "epochs": epochs, "step": step}))
        progress(_Event("metrics", {"epoch": epoch, "train_loss": 1.0 / epoch}))
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.write_text(f"epoch {epoch}")
        if mode == "crash-once" and resumed is None:
            time.sleep(3.5)  # long enough for the parent to upload the checkpoint
            os.kill(os.getpid(), signal.SIGKILL)
    if mode == "diverge":
        raise TrainingDiverged("the loss became NaN at epoch 3; lower lr")
    if mode == "slow":
        while True:
            if should_stop():
                raise Cancelled("stopped on request")
            time.sleep(0.05)
    if mode == "hang":
        while True:  # a hung teacher: never looks at should_stop
            time.sleep(1)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "student.bin").write_bytes(b"student weights")
    (out / "report.json").write_text('{"ok": true}')
    progress(_Event("log", {"message": "done"}))
    return _Outcome(
        {"student": {"accuracy": 0.5}, "resumed_from": resumed, "inputs": sorted(models)},
        [
            _Artifact("student.bin", "student_safetensors", out / "student.bin"),
            _Artifact("report.json", "report", out / "report.json"),
        ],
    )
