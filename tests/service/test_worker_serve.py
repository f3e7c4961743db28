"""`distill serve`: the whole service from one command, stopped cleanly by Ctrl-C or SIGTERM."""

from __future__ import annotations

import signal
import socket
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
    cli = [sys.executable, "-c", "from cli.app import app; app(prog_name='distill')"]
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
        # The lines come once serve's own /healthz check answered, which may be after ours.
        serve.wait_for_output("press Ctrl-C to stop", timeout=30)
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


def _serve(tmp_path: Path, port: int) -> Proc:
    cli = [sys.executable, "-c", "from cli.app import app; app(prog_name='distill')"]
    args = [*cli, "serve", "--port", str(port), "--data-dir", str(tmp_path / "data")]
    return Proc("serve", args, service_env(), tmp_path)


def test_the_url_is_printed_once_the_api_answers_and_sigterm_stops_every_child(
    tmp_path: Path,
) -> None:
    port = free_port()
    serve = _serve(tmp_path, port)
    try:
        serve.wait_for_output("distill is running at", timeout=90)
        # The line is printed only after /healthz answered: a user who clicks it gets a page.
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
        children = psutil.Process(serve.popen.pid).children(recursive=True)
        assert len(children) >= 3

        serve.popen.send_signal(signal.SIGTERM)  # a plain `kill`, a supervisor, a CI timeout
        assert serve.popen.wait(30) == 0, serve.output()[-3000:]
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert alive == [], [c.cmdline() for c in alive]
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
        out = serve.output()
        # The start-up lines are not buried: no Celery banners, no warning about root, no
        # broker tables created twice.
        assert "[config]" not in out and "superuser" not in out, out
        assert "Connection to broker lost" not in out, out
    finally:
        serve.stop()


def test_ctrl_c_stops_serve_even_when_started_with_sigint_ignored(tmp_path: Path) -> None:
    # A script that runs `distill serve &` hands it SIGINT ignored (so does `nohup … &`); a
    # `kill -INT`, or the demo stopping the service it started, must still stop it all.
    port = free_port()
    cli = [sys.executable, "-c", "from cli.app import app; app(prog_name='distill')"]
    serve_args = [*cli, "serve", "--port", str(port), "--data-dir", str(tmp_path / "data")]
    args = ["bash", "-c", 'trap "" INT; exec "$@"', "serve", *serve_args]
    serve = Proc("serve", args, service_env(), tmp_path)
    try:
        serve.wait_for_output("press Ctrl-C to stop", timeout=90)
        children = psutil.Process(serve.popen.pid).children(recursive=True)
        assert len(children) >= 3
        serve.popen.send_signal(signal.SIGINT)
        assert serve.popen.wait(30) == 0, serve.output()[-3000:]
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert alive == [], [c.cmdline() for c in alive]
    finally:
        serve.stop()


def test_a_port_in_use_is_reported_before_anything_starts(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        serve = _serve(tmp_path, port)
        try:
            assert serve.popen.wait(60) == 1
        finally:
            serve.stop()
    out = serve.output()
    assert f"cannot listen on 127.0.0.1:{port}" in out and "--port" in out, out
    assert "distill is running" not in out and "exited with code" not in out, out
    assert not (tmp_path / "data").exists()  # nothing was set up


def test_serve_creates_the_broker_tables_before_starting_the_worker_and_reconciler(
    tmp_path: Path,
) -> None:
    # Both children open the embedded broker at once on a fresh data dir; if the tables were
    # not there yet, both would create them and one would log a lost broker connection.
    import sqlite3

    from cli.serve_cmds import _create_broker_tables

    broker = tmp_path / "broker.db"
    _create_broker_tables(f"sqla+sqlite:///{broker}")
    with sqlite3.connect(broker) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    assert {"kombu_queue", "kombu_message"} <= tables
