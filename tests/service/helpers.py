"""Service test helpers: fresh databases, and the API and a worker as real subprocesses."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from core.models import Tenant, new_id
from core.schema import upgrade_database
from worker.celery_app import celery_command, worker_argv

ROOT = Path(__file__).resolve().parents[2]


# --- databases -------------------------------------------------------------------------------


def migrate(url: str) -> None:
    """Create the schema with the project's migrations."""
    upgrade_database(url)


@contextmanager
def fresh_postgres(base_url: str) -> Iterator[str]:
    """A new, empty PostgreSQL database on the server of ``base_url``; dropped afterwards."""
    name = f"distill_test_{secrets.token_hex(4)}"
    admin = create_engine(base_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(base_url).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        from core.db import get_engine

        get_engine(url).dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def make_tenant(session: Any, name: str | None = None) -> Tenant:
    tenant = Tenant(id=new_id("ten"), name=name or f"tenant-{secrets.token_hex(4)}")
    session.add(tenant)
    session.commit()
    return tenant


# --- processes -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A subprocess in its own process group with its output in a log file; always stopped."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.popen = subprocess.Popen(
            args,
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_output(self, needle: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.output():
                return
            if self.popen.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} did not print {needle!r}:\n{self.output()[-4000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Signal the whole group, wait, then kill what is left (job children included)."""
        if self.popen.poll() is None:
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, sig)
            with suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        if self.popen.poll() is None:
            self.popen.wait(5)
        self._log.close()


def service_env(**settings: str) -> dict[str, str]:
    """The environment for a service process: this one's, minus DISTILL_*, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILL_")}
    env.update({f"DISTILL_{k.upper()}": v for k, v in settings.items()})
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_api(
    env: dict[str, str],
    log_dir: Path,
    workers: int = 1,
    factory: str = "api.main:create_app",
    app_dir: str = ".",
) -> tuple[Proc, str]:
    """uvicorn with the app factory (``workers`` processes); returns once /healthz answers."""
    port = free_port()
    proc = Proc(
        "api",
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            factory,
            "--app-dir",
            app_dir,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(workers),
        ],
        env,
        log_dir,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            break
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.stop()
    raise RuntimeError(f"the API did not start:\n{proc.output()[-4000:]}")


def start_worker(env: dict[str, str], log_dir: Path, queues: str = "cpu") -> Proc:
    """A real Celery worker (``distill worker``); returns once it is consuming."""
    proc = Proc(
        "worker",
        celery_command(worker_argv(queues.split(","), 1)),
        env,
        log_dir,
    )
    try:
        proc.wait_for_output("ready.", timeout=60)
    except RuntimeError:
        proc.stop()
        raise
    return proc
