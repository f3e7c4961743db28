"""`distill serve`: the whole service from one command, stopped cleanly by Ctrl-C."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.service.helpers import Proc, free_port, service_env

pytestmark = pytest.mark.service


def test_serve_starts_everything_and_ctrl_c_stops_it(tmp_path: Path) -> None:
    port = free_port()
    data = tmp_path / "data"
    cli = [sys.executable, "-c", "from client.cli import app; app(prog_name='distill')"]
    serve = Proc(
        "serve",
        [*cli, "serve", "--port", str(port), "--data-dir", str(data)],
        service_env(),
        tmp_path,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        ready = None
        while time.monotonic() < deadline and serve.popen.poll() is None:
            try:
                ready = httpx.get(f"{base}/readyz", timeout=2)
                if ready.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        assert ready is not None and ready.status_code == 200, serve.output()[-3000:]
        assert ready.json() == {"status": "ready"}  # the checks are the operator's to see
        # Embedded defaults on 127.0.0.1: no key needed, everything under --data-dir.
        assert httpx.get(f"{base}/v1/jobs", timeout=5).status_code == 200
        assert (data / "distill.db").is_file() and (data / "broker.db").is_file()
        out = serve.output()
        assert base in out and str(data.resolve()) in out
        children = psutil.Process(serve.popen.pid).children(recursive=True)
        commands = " ".join(" ".join(c.cmdline()) for c in children)
        assert "uvicorn" in commands and "--queues cpu" in commands and "--beat" in commands

        serve.popen.send_signal(signal.SIGINT)  # Ctrl-C reaches serve alone (own group here)
        assert serve.popen.wait(30) == 0
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert alive == [], [c.cmdline() for c in alive]
    finally:
        serve.stop()
