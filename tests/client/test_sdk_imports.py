"""The SDK is an HTTP client and nothing else: importing it loads no engine, worker or CLI."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import client

ROOT = Path(__file__).resolve().parents[2]

# Top-level packages a user of the SDK must not get: the engine and its torch, the server side,
# and the command line.
FORBIDDEN = ("torch", "core", "worker", "api", "cli", "typer")


def _imported_after(statement: str) -> set[str]:
    """Top-level packages in sys.modules after ``statement`` runs in a fresh interpreter."""
    code = f"{statement}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    return {name.split(".")[0] for name in json.loads(run.stdout.splitlines()[-1])}


def test_importing_the_sdk_loads_no_engine_worker_or_cli() -> None:
    loaded = _imported_after("from client.sdk import Client")
    assert "httpx" in loaded  # the check sees what the import brought in
    assert not loaded & set(FORBIDDEN), sorted(loaded & set(FORBIDDEN))


def test_no_module_of_the_client_package_loads_them() -> None:
    modules = [f"client.{m.name}" for m in pkgutil.iter_modules(client.__path__)]
    assert "client.progress" in modules and "client.sdk" in modules
    loaded = _imported_after("\n".join(f"import {m}" for m in modules))
    assert not loaded & set(FORBIDDEN), sorted(loaded & set(FORBIDDEN))
