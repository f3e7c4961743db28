"""`distill demo` end to end, as a user runs it: its own service, a real job, the student saved."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cli.demo_cmd import answers
from tests.service.helpers import ROOT, service_env

pytestmark = [pytest.mark.service, pytest.mark.slow]


def test_demo_runs_end_to_end_and_stops_its_service(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    # Nothing answers on port 1, so the demo starts (and must stop) its own service.
    proc = subprocess.run(
        [sys.executable, "-m", "cli", "demo", "--url", "http://127.0.0.1:1",
         "--out", str(out), "--epochs", "4"],
        cwd=ROOT, env=service_env(), capture_output=True, text=True, timeout=420,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Validation results" in proc.stdout and "baseline" in proc.stdout
    # 4 epochs may be too few for KD to pass the labels-only baseline; either way it is said.
    assert "verdict: " in proc.stdout
    report = json.loads((out / "student" / "report.json").read_text())
    if report["result"]["verdict"] == "baseline_better":
        assert "warning: the labels-only baseline beat" in proc.stdout
    for name in ("student.onnx", "student.pt", "student.safetensors", "report.json"):
        assert (out / "student" / name).stat().st_size > 0, name
    assert report["result"]["baseline"]["accuracy"] is not None

    url = re.search(r"running at (http://127\.0\.0\.1:\d+)", proc.stderr)
    assert url is not None, proc.stderr
    assert not answers(url.group(1)), "the demo left its service running"
