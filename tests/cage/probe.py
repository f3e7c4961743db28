"""What a hostile upload would try, run inside the cage; each attempt's outcome comes back.

Used by the cage tests as the function a sandboxed inspection runs and as a job's engine, so the
same attempts are made from both kinds of caged process.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

MARKER = b"written from inside the cage"


def attempt(targets: dict[str, Any]) -> dict[str, Any]:
    """Try to read, write, connect and look around; say what worked."""
    found: dict[str, Any] = {"uid": os.getuid(), "gid": os.getgid(), "env": dict(os.environ)}
    found["read"] = {}
    for path in targets.get("read", []):
        try:
            found["read"][path] = Path(path).read_bytes()[:200].decode(errors="replace")
        except OSError as exc:
            found["read"][path] = f"refused: {type(exc).__name__}"
    found["write"] = {}
    for path in targets.get("write", []):
        try:
            with open(path, "r+b") as f:
                f.write(MARKER)
            found["write"][path] = "written"
        except OSError as exc:
            found["write"][path] = f"refused: {type(exc).__name__}"
    found["connect"] = {}
    for port in targets.get("ports", []):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                found["connect"][str(port)] = "connected"
        except OSError as exc:
            found["connect"][str(port)] = f"refused: {type(exc).__name__}"
    found["processes"] = sorted(int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit())
    found["root"] = sorted(p.name for p in Path("/").iterdir())
    return found


def inspect_in_cage(path: str) -> dict[str, Any]:
    """Sandbox side: the targets are the JSON file the caller placed."""
    return attempt(json.loads(Path(path).read_text()))


class _Outcome:
    def __init__(self, result: dict[str, Any]) -> None:
        self.result, self.history, self.artifacts = result, [], []


def run_job(spec, *, models, dataset, dataset_options, out_dir, work_dir, progress, should_stop):
    """Job side (an engine): the targets are the job's dataset file."""
    found = attempt(json.loads(Path(dataset).read_text()))
    found["inputs_writable"] = os.access(Path(dataset), os.W_OK)
    return _Outcome(found)
