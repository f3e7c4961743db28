"""Rich output shared by the CLI commands: live job progress and the result tables."""

from __future__ import annotations

from types import TracebackType
from typing import Any

from rich.console import Console, Group
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn
from rich.table import Table

from core.distill.types import Event

# Result rows in display order: key, label, formatter.
_ROWS: list[tuple[str, str]] = [
    ("accuracy", "accuracy"),
    ("f1_macro", "F1 (macro)"),
    ("agreement", "agreement with teacher"),
    ("mse", "MSE to teacher"),
    ("cosine", "cosine to teacher"),
    ("perplexity", "perplexity"),
    ("token_agreement", "next-token agreement with teacher"),
    ("kl_to_teacher", "KL to teacher (per token)"),
    ("parameters", "parameters"),
    ("size_bytes", "size"),
    ("latency_ms_p50", "latency p50"),
    ("throughput_per_s", "throughput"),
    ("latency_ms_per_token", "latency per token (greedy)"),
    ("tokens_per_s", "tokens/s (greedy, batch 1)"),
]


def human_bytes(n: float) -> str:
    """1234567 → '1.2 MB'."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover - loop always returns


def format_metric(key: str, value: Any) -> str:
    """One metric value the way a person reads it."""
    if value is None:
        return "–"
    if key in ("accuracy", "f1_macro", "agreement", "token_agreement"):
        return f"{100 * float(value):.2f} %"
    if key == "parameters":
        return f"{int(value):,}"
    if key == "size_bytes":
        return human_bytes(float(value))
    if key == "latency_ms_p50":
        return f"{float(value):.3f} ms"
    if key == "latency_ms_per_token":
        return f"{float(value):.3f} ms"
    if key == "tokens_per_s":
        return f"{float(value):,.0f} /s"
    if key == "throughput_per_s":
        return f"{float(value):,.0f} /s"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def result_table(result: dict[str, Any]) -> Table:
    """Teacher vs student (vs baseline) on the validation split."""
    columns = [c for c in ("teacher", "student", "baseline") if result.get(c)]
    table = Table(title="Validation results", title_justify="left")
    table.add_column("metric")
    for column in columns:
        table.add_column(column, justify="right")
    for key, label in _ROWS:
        values = [result[c].get(key) for c in columns]
        if all(v is None for v in values):
            continue
        table.add_row(label, *(format_metric(key, v) for v in values))
    return table


def compression_table(steps: list[dict[str, Any]]) -> Table | None:
    """Before/after each compression step, or None when nothing was compressed."""
    if not steps:
        return None
    table = Table(title="Compression", title_justify="left")
    for name in ("step", "metric", "before", "after"):
        table.add_column(name, justify="left" if name in ("step", "metric") else "right")
    for step in steps:
        label = step["step"] if step["step"] != "quantize" else f"quantize ({step.get('mode')})"
        for key, metric in _ROWS:
            before, after = step["before"].get(key), step["after"].get(key)
            if before is None and after is None:
                continue
            table.add_row(label, metric, format_metric(key, before), format_metric(key, after))
            label = ""
    return table


def samples_table(samples: list[dict[str, str]]) -> Table | None:
    """Causal LMs: the teacher's and the student's continuations of validation prompts."""
    if not samples:
        return None
    table = Table(title="Samples (greedy)", title_justify="left", show_lines=True)
    for name in ("prompt", "teacher", "student"):
        table.add_column(name, overflow="fold")
    for row in samples:
        table.add_row(row.get("prompt", ""), row.get("teacher", ""), row.get("student", ""))
    return table


def summary_lines(result: dict[str, Any]) -> list[str]:
    """Compression ratio, speedup and where the student stands against the baseline."""
    lines = []
    if result.get("compression_ratio") is not None:
        lines.append(f"compression ratio: {float(result['compression_ratio']):.1f}×")
    if result.get("speedup") is not None:
        lines.append(f"speedup: {float(result['speedup']):.1f}×")
    baseline, student = result.get("baseline"), result.get("student") or {}
    if baseline and baseline.get("accuracy") is not None and student.get("accuracy") is not None:
        gain = 100 * (float(student["accuracy"]) - float(baseline["accuracy"]))
        lines.append(f"distillation vs labels-only baseline: {gain:+.2f} accuracy points")
    return lines


def render_result(result: dict[str, Any]) -> Group:
    """Everything ``distill run`` prints at the end of a job."""
    parts: list[Any] = [result_table(result)]
    compression = compression_table(result.get("compression") or [])
    if compression is not None:
        parts.append(compression)
    samples = samples_table(result.get("samples") or [])
    if samples is not None:
        parts.append(samples)
    parts.extend(summary_lines(result))
    return Group(*parts)


class JobProgress:
    """A live progress bar fed with engine events: stage, epoch, loss, val metric, ETA.

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

    def __call__(self, event: Event) -> None:
        data = event.data
        if event.type == "log":
            self._progress.console.print(f"[dim]{data.get('message', '')}[/dim]")
        elif event.type == "progress":
            label = data.get("label") or f"stage {data.get('stage', 1)}/{data.get('stages', 1)}"
            eta = data.get("eta_seconds")
            fields: dict[str, str] = {"eta": f"ETA {_duration(eta)}" if eta is not None else ""}
            if data.get("epochs"):
                fields["epoch"] = f"epoch {data.get('epoch', 0)}/{data['epochs']}"
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
