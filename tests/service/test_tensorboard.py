"""Job metrics exported to TensorBoard when DISTILL_TENSORBOARD_DIR is set."""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.service.test_worker_runner import Env


def test_each_epochs_metrics_become_scalars_in_the_jobs_run_folder(tmp_path: Path) -> None:
    env = Env(tmp_path)
    env.settings = env.settings.model_copy(update={"tensorboard_dir": tmp_path / "tb"})
    job_id = env.submit("ok")
    assert env.claim_and_run(job_id) == "succeeded"

    runs = EventAccumulator(str(tmp_path / "tb" / job_id))
    runs.Reload()
    assert runs.Tags()["scalars"] == ["stage_1/train_loss"]
    points = runs.Scalars("stage_1/train_loss")
    assert [p.step for p in points] == [1, 2, 3]
    assert [p.value for p in points] == pytest.approx([1.0, 1 / 2, 1 / 3])


def test_without_the_setting_nothing_is_written(tmp_path: Path) -> None:
    env = Env(tmp_path)
    job_id = env.submit("ok")
    assert env.claim_and_run(job_id) == "succeeded"
    assert not list(tmp_path.rglob("events.out.tfevents.*"))
