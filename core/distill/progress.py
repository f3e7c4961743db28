"""A job's progress and cancellation: the caller's callback wrapped to speak for the whole job,
stage by stage, and the check of the caller's stop flag."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from core.distill.types import Event, ProgressFn, StopFn
from core.errors import Cancelled


@dataclass
class Reporter:
    """Wraps the caller's progress callback for the whole job.

    The trainer reports each stage's fraction from 0 to 1; this turns it into the job's
    fraction (stage ``k`` of ``n`` covers ``(k-1)/n .. k/n``, so it only grows), extends the
    ETA to the stages still to come, labels events with the running stage, and keeps the
    metric history of every stage (epochs restored from a checkpoint included).
    """

    progress: ProgressFn
    history: list[dict[str, Any]] = field(default_factory=list)
    label: str = ""
    stage_started: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)  # seconds spent in each phase
    phase_name: str = "load"
    phase_started: float = field(default_factory=time.monotonic)

    def phase(self, name: str) -> None:
        """From now on the time goes to phase ``name`` (the result's ``seconds_by_phase``)."""
        now = time.monotonic()
        self.phases[self.phase_name] = (
            self.phases.get(self.phase_name, 0.0) + now - self.phase_started
        )
        self.phase_name, self.phase_started = name, now

    def seconds_by_phase(self) -> dict[str, float]:
        self.phase(self.phase_name)
        return {name: round(seconds, 3) for name, seconds in self.phases.items()}

    def start(self, label: str) -> None:
        self.label = label
        self.stage_started = time.monotonic()

    def __call__(self, event: Event) -> None:
        data = dict(event.data)
        if event.type == "progress":
            stage, stages = int(data.get("stage", 1)), int(data.get("stages", 1))
            within = float(data.get("fraction") or 0.0)
            data["stage_fraction"] = within
            data["fraction"] = round((stage - 1 + within) / stages, 4)
            eta = data.get("eta_seconds")
            if eta is not None and within > 0:
                per_stage = (time.monotonic() - self.stage_started) / within
                data["eta_seconds"] = round(float(eta) + (stages - stage) * per_stage, 1)
            data["label"] = self.label
        elif event.type == "metrics":
            data["label"] = self.label
        self.progress(Event(event.type, data))

    def keep(self, rows: list[dict[str, Any]]) -> None:
        """A finished stage's epochs (those restored from a checkpoint too) for the report."""
        self.history.extend({**row, "label": self.label} for row in rows)

    def stage_done(self, stage: int, stages: int) -> None:
        """A stage that stopped early still moves the job's fraction to its end."""
        self.progress(
            Event(
                "progress",
                {
                    "stage": stage,
                    "stages": stages,
                    "fraction": round(stage / stages, 4),
                    "stage_fraction": 1.0,
                    "eta_seconds": None,
                    "label": self.label,
                },
            )
        )

    def log(self, message: str) -> None:
        self.progress(Event("log", {"message": message}))


def check_stop(should_stop: StopFn) -> None:
    """Raise Cancelled when the caller asked the job to stop."""
    if should_stop():
        raise Cancelled("the job was cancelled")
