"""Do identical jobs report the same speedup? N identical `distill run` jobs, their figures.

Each job is its own process (as on a worker): the same teacher, data, spec and seed. The script
prints each job's teacher and student latency p50, the paired speedup with its range over the
timing rounds and the ``noisy`` flag, then the spread across jobs (largest / smallest speedup;
the issue's bar is within ±30%, i.e. at most 1.3). For contrast it also times the same two
models the way the engine did before (teacher then student, one after the other, torch's
default thread count), once per job, in this process.

    .venv/bin/python -m bench.speedup_spread                     # 2 jobs, about a minute
    .venv/bin/python -m bench.speedup_spread --jobs 4 --json bench/results/speedup.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

ROOT = Path(__file__).resolve().parent.parent


def make_files(folder: Path) -> Path:
    """teacher.pt2, digits.npz and spec.yaml in ``folder``; returns the spec's path."""
    from sklearn.model_selection import train_test_split

    from cli.digits import DigitsCNN, digits_arrays

    x, y = digits_arrays()
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, stratify=y, random_state=0)
    torch.manual_seed(0)
    # A small CNN for 8×8 digits (about 98% test accuracy after a few seconds).
    teacher = DigitsCNN(hidden=None, third_conv=False, pool="none")
    opt = torch.optim.Adam(teacher.parameters(), lr=2e-3)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    for _ in range(15):
        for i in torch.randperm(len(xt)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(teacher(xt[i]), yt[i]).backward()
            opt.step()
    teacher.eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(teacher, (xt[:2],), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(folder / "teacher.pt2"))
    np.savez(folder / "digits.npz", x=x_tr, y=y_tr, x_val=x_te, y_val=y_te)
    spec = {
        "teacher": {"path": "teacher.pt2"},
        "dataset_path": "digits.npz",
        "student": {"preset": "mlp", "width": 64, "depth": 1},
        "training": {"epochs": 5, "batch_size": 64, "seed": 0},
        "export": ["torchscript", "onnx"],
    }
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def run_job(spec: Path, out: Path) -> dict[str, Any]:
    """One `distill run` in its own process; its result."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [sys.executable, "-m", "cli", "run", str(spec), "--out", str(out), "--json"],
        check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    return json.loads((out / "report.json").read_text())["result"]


def sequential_speedup(folder: Path, out: Path) -> float:
    """The engine's former way: teacher, then student, each on its own, default threads."""
    from core.distill.evaluate import latency_metrics
    from core.distill.teachers import load_teacher
    from core.distill.types import ModelFile

    x = torch.from_numpy(np.load(folder / "digits.npz")["x_val"])
    teacher = load_teacher(
        ModelFile(folder / "teacher.pt2", "exported_program"),
        torch.device("cpu"),
        input_shape=(1, 8, 8),
    )
    student = torch.jit.load(str(out / "student.pt")) if (out / "student.pt").exists() else None
    if student is None:
        import onnxruntime as ort

        student = ort.InferenceSession(
            str(out / "student.onnx"), providers=["CPUExecutionProvider"]
        )
    t = latency_metrics(teacher, x)["latency_ms_p50"]
    s = latency_metrics(student, x)["latency_ms_p50"]
    return t / s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="identical jobs to run (default 2)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="speedup-") as tmp:
        folder = Path(tmp)
        spec = make_files(folder)
        rows = []
        for i in range(args.jobs):
            started = time.monotonic()
            result = run_job(spec, folder / f"out{i}")
            rows.append(
                {
                    "job": i + 1,
                    "seconds": round(time.monotonic() - started, 1),
                    "teacher_p50_ms": result["teacher"]["latency_ms_p50"],
                    "teacher_range_ms": result["teacher"]["latency_ms_range"],
                    "student_p50_ms": result["student"]["latency_ms_p50"],
                    "student_range_ms": result["student"]["latency_ms_range"],
                    "student_onnx_p50_ms": result["student"].get("latency_ms_p50_onnx"),
                    "speedup": result["speedup"],
                    "speedup_range": result["speedup_range"],
                    "noisy": result["timing"]["noisy"],
                    "sequential_speedup": round(sequential_speedup(folder, folder / f"out{i}"), 2),
                }
            )
    speedups = [r["speedup"] for r in rows]
    former = [r["sequential_speedup"] for r in rows]
    summary = {
        "jobs": rows,
        "speedup_max_over_min": round(max(speedups) / min(speedups), 3),
        "speedup_median": statistics.median(speedups),
        "sequential_max_over_min": round(max(former) / min(former), 3),
        "within_30_percent": max(speedups) / min(speedups) <= 1.3,
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
    }
    print("| job | teacher p50 (range) ms | student p50 (range) ms | student onnxruntime ms "
          "| speedup (range) | noisy | former sequential speedup |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        t, s, sp = r["teacher_range_ms"], r["student_range_ms"], r["speedup_range"]
        print(
            f"| {r['job']} | {r['teacher_p50_ms']:.4f} ({t[0]:.4f}–{t[1]:.4f}) "
            f"| {r['student_p50_ms']:.4f} ({s[0]:.4f}–{s[1]:.4f}) | {r['student_onnx_p50_ms']:.4f} "
            f"| {r['speedup']:.2f}× ({sp[0]:.2f}–{sp[1]:.2f}) | {r['noisy']} "
            f"| {r['sequential_speedup']:.2f}× |"
        )
    print(
        f"\nspeedup across jobs: largest / smallest = {summary['speedup_max_over_min']} "
        f"(within ±30%: {summary['within_30_percent']}); the former sequential way: "
        f"{summary['sequential_max_over_min']}; load average {summary['load_average']}"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
