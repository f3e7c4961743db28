"""The terminal progress bar: what it shows follows the job's phases."""

from __future__ import annotations

import io
from types import SimpleNamespace

from rich.console import Console

from client.progress import JobProgress


def _event(type_: str, **data: object) -> SimpleNamespace:
    return SimpleNamespace(type=type_, data=data)


def test_the_epoch_count_is_cleared_when_a_phase_without_epochs_follows() -> None:
    out = io.StringIO()
    with JobProgress(Console(file=out, width=160, force_terminal=False)) as bar:
        bar(_event("progress", label="baseline", fraction=0.5, epoch=1, epochs=200))
        assert bar._progress.tasks[0].fields["epoch"] == "epoch 1/200"
        bar(_event("progress", label="evaluating", fraction=1.0))
        task = bar._progress.tasks[0]
    assert task.fields["epoch"] == "" and task.description == "evaluating"
    assert "epoch 1/200" not in out.getvalue().splitlines()[-1]
