"""A job's progress on the terminal: a rich bar fed with events (the engine's or the API's)."""

from __future__ import annotations

from types import SimpleNamespace, TracebackType
from typing import Any, Protocol

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn


class ProgressEvent(Protocol):
    """What the bar reads from an event: the engine's and the SDK's events both have these."""

    type: str
    data: dict[str, Any]


class JobProgress:
    """A live progress bar fed with events: stage, epoch, loss, val metric, ETA.

    Use as a context manager and pass the instance as the engine's ``progress`` callback.
    """

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[epoch]}"),
            TextColumn("{task.fields[loss]}"),
            TextColumn("{task.fields[metric]}"),
            TextColumn("{task.fields[eta]}"),
            console=self.console,
            transient=False,
        )
        self._task = self._progress.add_task(
            "starting", total=1.0, epoch="", loss="", metric="", eta=""
        )

    def __enter__(self) -> JobProgress:
        self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.stop()

    def __call__(self, event: ProgressEvent) -> None:
        data = event.data
        if event.type == "log":
            self._progress.console.print(f"[dim]{data.get('message', '')}[/dim]")
        elif event.type == "progress":
            label = data.get("label") or f"stage {data.get('stage', 1)}/{data.get('stages', 1)}"
            eta = data.get("eta_seconds")
            fields: dict[str, str] = {"eta": f"ETA {_duration(eta)}" if eta is not None else ""}
            # A phase without epochs (evaluation, export) clears the last stage's epoch count.
            epochs = data.get("epochs")
            fields["epoch"] = f"epoch {data.get('epoch', 0)}/{epochs}" if epochs else ""
            self._progress.update(
                self._task,
                completed=float(data.get("fraction") or 0.0),
                description=str(label),
                **fields,
            )
        elif event.type == "metrics":
            updates: dict[str, str] = {}
            if data.get("train_loss") is not None:
                updates["loss"] = f"loss {float(data['train_loss']):.4f}"
            for key in ("val_accuracy", "val_mse"):
                if data.get(key) is not None:
                    updates["metric"] = f"{key} {float(data[key]):.4f}"
                    break
            self._progress.update(self._task, **updates)


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(float(seconds))))
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


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
