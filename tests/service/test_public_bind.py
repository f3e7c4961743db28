"""`distill api` and `distill serve` refuse to serve without auth on an address other machines
can reach, unless the operator says so explicitly (and then they warn loudly)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from core.config import is_loopback
from tests.service.helpers import Proc, free_port, migrate, service_env

pytestmark = pytest.mark.service

CLI = [sys.executable, "-c", "from cli.app import app; app(prog_name='distill')"]


@pytest.mark.parametrize("command", ["api", "serve"])
def test_auth_off_on_a_public_address_is_refused_at_start(command: str, tmp_path: Path) -> None:
    port = free_port()
    env = service_env(auth="off", data_dir=str(tmp_path / "data"))
    run = subprocess.run(
        [*CLI, command, "--host", "0.0.0.0", "--port", str(port)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stdout + run.stderr
    assert "DISTILL_AUTH=off" in run.stderr and "DISTILL_ALLOW_UNAUTHENTICATED_PUBLIC" in run.stderr
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
    assert not (tmp_path / "data").exists()  # refused before anything was created


def test_an_explicit_opt_in_serves_with_a_loud_warning(tmp_path: Path) -> None:
    port = free_port()
    url = f"sqlite:///{tmp_path / 'distill.db'}"
    migrate(url)
    env = service_env(
        auth="off",
        allow_unauthenticated_public="1",
        data_dir=str(tmp_path / "data"),
        database_url=url,
        warm_sandbox="false",
    )
    api = Proc("api", [*CLI, "api", "--host", "0.0.0.0", "--port", str(port)], env, tmp_path)
    try:
        deadline = time.monotonic() + 60
        answer = None
        while time.monotonic() < deadline and api.popen.poll() is None:
            try:
                answer = httpx.get(f"http://127.0.0.1:{port}/v1/jobs", timeout=2)
                break
            except httpx.HTTPError:
                time.sleep(0.3)
        assert answer is not None and answer.status_code == 200, api.output()[-3000:]
        assert "WARNING: auth is off on 0.0.0.0" in api.output()
    finally:
        api.stop()


def test_loopback_addresses() -> None:
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "10.0.0.5", "192.168.1.2", "api.example.com"):
        assert not is_loopback(host), host
