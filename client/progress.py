"""A service job's progress on the terminal: API events and job objects fed to JobProgress."""

from __future__ import annotations

from types import SimpleNamespace, TracebackType
from typing import Any

from rich.console import Console


class ProgressFeed:
    """Draws a rich progress bar (stage, epoch, loss, val metric, ETA) from a polled job.

    ``event`` takes the job's API events (status, metrics, log); ``job`` takes the job object,
    whose ``progress`` carries the fraction and ETA. Disabled, it does nothing.
    """

    def __init__(self, enabled: bool = True, console: Console | None = None) -> None:
        self.enabled = enabled
        self.console = console or Console(stderr=True)
        self._bar: Any = None
        self._last_status: str | None = None

    def __enter__(self) -> ProgressFeed:
        if self.enabled:
            from client.render import JobProgress

            self._bar = JobProgress(self.console)
            self._bar.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._bar is not None:
            self._bar.__exit__(exc_type, exc, tb)
            self._bar = None

    def event(self, event: Any) -> None:
        """One API event (anything with ``type`` and ``data``)."""
        if self._bar is None:
            return
        if event.type == "status":
            status = event.data.get("status")
            if status != self._last_status:
                self._last_status = status
                attempt = event.data.get("attempt")
                suffix = f" (attempt {attempt})" if attempt and attempt > 1 else ""
                self.console.print(f"[dim]status: {status}{suffix}[/dim]")
        elif event.type in ("metrics", "log", "progress"):
            self._bar(event)

    def job(self, job: Any) -> None:
        """The job object's progress (fraction, stage, epoch, ETA)."""
        if self._bar is None:
            return
        progress = {k: v for k, v in (job.progress or {}).items() if v is not None}
        if "epoch" not in progress:
            progress.pop("epochs", None)  # between stages: no epoch to show
        if job.status == "succeeded":
            progress["fraction"] = 1.0
            progress["eta_seconds"] = None
        if job.status == "queued":
            progress.setdefault("label", "queued")
        self._bar(SimpleNamespace(type="progress", data=progress))
