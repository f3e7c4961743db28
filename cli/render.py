"""Rich output shared by the CLI commands: the result tables."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

# Result rows in display order: key, label, formatter.
_ROWS: list[tuple[str, str]] = [
    ("accuracy", "accuracy"),
    ("f1_macro", "F1 (macro)"),
    ("agreement", "agreement with teacher"),
    ("mse", "MSE to teacher"),
    ("cosine", "cosine to teacher"),
    ("perplexity", "perplexity"),
    ("token_agreement", "next-token agreement with teacher"),
    ("kl_to_teacher", "KL to teacher"),
    ("parameters", "parameters"),
    ("size_bytes", "size"),
    ("latency_ms_p50", "latency p50"),
    ("latency_ms_range", "latency range (rounds)"),
    ("latency_ms_p50_onnx", "latency p50 (onnxruntime)"),
    ("throughput_per_s", "throughput"),
    ("throughput_per_s_onnx", "throughput (onnxruntime)"),
    ("latency_ms_per_token", "latency per token (greedy)"),
    ("tokens_per_s", "tokens/s (greedy, batch 1)"),
]

VERDICT_TEXT = {
    "distillation_helped": "distillation helped: the student beats the labels-only baseline",
    "no_significant_difference": (
        "no significant difference between the student and the labels-only baseline"
    ),
    "baseline_better": "the labels-only baseline is better than the distilled student",
}


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
    if key.startswith("latency_ms_range"):
        return f"{float(value[0]):.3f}–{float(value[1]):.3f} ms"
    if key.startswith("latency_ms"):
        return f"{float(value):.3f} ms"
    if key == "latency_ms_per_token":
        return f"{float(value):.3f} ms"
    if key == "tokens_per_s":
        return f"{float(value):,.0f} /s"
    if key.startswith("throughput_per_s"):
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


def ratio_phrase(ratio: float | None, smaller: str = "smaller", larger: str = "larger") -> str:
    """A teacher / student ratio as people say it: 12.3 → '12.3× smaller', 0.5 → '2× larger'."""
    if ratio is None or ratio <= 0:
        return "–"
    if ratio >= 1:
        return f"{ratio:.3g}× {smaller}"
    return f"{1 / ratio:.3g}× {larger}"


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
    """The student against the teacher (parameters, bytes, speed) and against the baseline."""
    lines = []
    ratio = result.get("parameter_ratio", result.get("compression_ratio"))
    if ratio is not None:
        lines.append(f"parameters: {ratio_phrase(ratio)} than the teacher")
    if result.get("size_ratio") is not None:
        lines.append(f"size: {ratio_phrase(result['size_ratio'])} than the teacher")
    if result.get("speedup") is not None:
        line = f"speedup: {ratio_phrase(result['speedup'], 'faster', 'slower')} than the teacher"
        timing, spread = result.get("timing") or {}, result.get("speedup_range")
        if spread:
            rounds = f" over {timing['rounds']} rounds" if timing.get("rounds") else ""
            runtime = f", {timing['speedup_runtime']}" if timing.get("speedup_runtime") else ""
            line += f" (teacher/student {spread[0]:.3g}–{spread[1]:.3g}×{rounds}{runtime})"
        if timing.get("noisy"):
            line += " — noisy: the timing rounds disagree (a busy machine)"
        lines.append(line)
    verdict, comparison = result.get("verdict"), result.get("baseline_comparison") or {}
    if verdict in VERDICT_TEXT:
        detail = ""
        if comparison.get("metric") == "accuracy":
            detail = (
                f" ({100 * comparison['difference']:+.2f} accuracy points, "
                f"p = {comparison['p_value']:.2g}, {comparison.get('test')})"
            )
        lines.append(f"verdict: {VERDICT_TEXT[verdict]}{detail}")
    else:
        baseline, student = result.get("baseline"), result.get("student") or {}
        if baseline and baseline.get("accuracy") is not None and student.get("accuracy"):
            gain = 100 * (float(student["accuracy"]) - float(baseline["accuracy"]))
            lines.append(f"distillation vs labels-only baseline: {gain:+.2f} accuracy points")
    return lines


def warning_line(result: dict[str, Any]) -> str | None:
    """The warning a user must not miss: the labels-only baseline beat the distilled student."""
    if result.get("verdict") != "baseline_better":
        return None
    text = result.get("warning") or VERDICT_TEXT["baseline_better"]
    return f"warning: {text}"


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
    warning = warning_line(result)
    if warning is not None:
        parts.append(Text(warning, style="bold yellow"))
    return Group(*parts)
