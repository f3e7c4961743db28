"""`distill worker`, `distill beat` and `distill serve`: the worker side and the whole service."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from cli.app import app

QUEUE_NAMES = ("cpu", "gpu", "control")


def _queues(value: str) -> list[str]:
    queues = [q.strip() for q in value.split(",") if q.strip()]
    unknown = [q for q in queues if q not in QUEUE_NAMES]
    if not queues or unknown:
        raise typer.BadParameter(
            f"unknown queue {', '.join(unknown) or '(none)'}; use cpu, gpu or cpu,gpu"
        )
    return list(dict.fromkeys(queues))


@app.command()
def worker(
    queues: Annotated[str, typer.Option(help="Queues to take jobs from: cpu, gpu or cpu,gpu.")] = (
        "cpu"
    ),
    concurrency: Annotated[int, typer.Option(min=1, help="Jobs run at the same time.")] = 1,
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
) -> None:
    """Run a job worker (Celery) configured by DISTILL_* settings."""
    # The default per-job memory limit shares the machine between the concurrent jobs.
    os.environ.setdefault("DISTILL_WORKER_CONCURRENCY", str(concurrency))
    from worker.celery_app import celery_app, worker_argv

    celery_app.worker_main(worker_argv(_queues(queues), concurrency, loglevel))


@app.command()
def beat(
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
) -> None:
    """Run the reconciler: its schedule (Celery beat) and a small worker for the control queue.

    Run exactly one per deployment. The reconciler has its own queue and worker so that it never
    waits behind long jobs.
    """
    from core.config import get_settings
    from worker.celery_app import celery_app, control_argv

    get_settings().data_dir.mkdir(parents=True, exist_ok=True)
    celery_app.worker_main(control_argv(loglevel))


def _cuda_available() -> bool:
    # Asked in a child so that the `serve` process itself never initialises CUDA.
    probe = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    return subprocess.run([sys.executable, "-c", probe], check=False).returncode == 0


def _migrate(url: str) -> None:
    from core.schema import upgrade_database

    upgrade_database(url)


def _create_broker_tables(url: str) -> None:
    # The embedded broker's tables, made once here: the worker and the reconciler starting
    # together on a fresh data dir would both create them, and one loses the race.
    if url.startswith(("sqla+", "sqlalchemy+")):
        from kombu import Connection

        with Connection(url) as conn:
            # The channel creates its tables when it first opens its session, not before.
            conn.default_channel.session  # noqa: B018


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to bind the API to.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the API.")] = 8000,
    data_dir: Annotated[
        Path | None,
        typer.Option(help="Where the database, blobs and broker live (default ./.distill)."),
    ] = None,
) -> None:
    """Run the whole service on this machine: API, one worker and the reconciler."""
    env = dict(os.environ)
    if data_dir is not None:
        env["DISTILL_DATA_DIR"] = str(data_dir.resolve())
    local_only = host in ("127.0.0.1", "localhost", "::1")
    if "DISTILL_AUTH" not in env and local_only:
        env["DISTILL_AUTH"] = "off"
    os.environ.update(env)

    from core.config import get_settings, public_auth_warning

    settings = get_settings()
    try:
        warning = public_auth_warning(settings, host)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if warning:
        typer.secho(warning, err=True, fg="red", bold=True)
    _check_port_free(host, port)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    _migrate(settings.database)
    _create_broker_tables(settings.broker)

    from worker.celery_app import celery_command, control_argv, worker_argv

    queues = ["cpu", "gpu"] if _cuda_available() else ["cpu"]
    commands = {
        "api": [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "api.main:create_app",
            "--host",
            host,
            "--port",
            str(port),
        ],
        # --quiet: no start-up banner; the lines that matter are ours, below.
        "worker": celery_command(["--quiet", *worker_argv(queues, 1, "WARNING")]),
        "reconciler": celery_command(["--quiet", *control_argv("WARNING")]),
    }
    # Noise a user can do nothing about: Celery's warning on every start as root (containers,
    # CI), and torch's own deprecation warning each time a job loads a torch.export teacher.
    quiet = [
        "ignore:You're running the worker with superuser privileges",
        "ignore:`isinstance(treespec",
    ]
    env.setdefault("PYTHONWARNINGS", ",".join(quiet))
    children: dict[str, subprocess.Popen[bytes]] = {}
    # Children get their own process groups, so Ctrl-C reaches only us and we stop them in order.
    # SIGTERM (kill, a supervisor, a CI timeout) stops them the same way. SIGINT is set too: a
    # process started in the background by a script inherits it ignored, and Python then leaves
    # it so, which would make `kill -INT` (and the demo's stop) do nothing.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    try:
        for name, args in commands.items():
            children[name] = subprocess.Popen(args, env=env, start_new_session=True)
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        url = f"http://{f'[{shown}]' if ':' in shown else shown}:{port}"
        _wait_until_up(url, children)
        typer.echo(f"distill is running at {url}  (dashboard: {url}/, API docs: {url}/docs)")
        typer.echo(f"data: {settings.data_dir.resolve()}  (database, blobs, broker)")
        if settings.auth == "off":
            typer.echo("auth is off: no API key needed on this machine")
        else:
            typer.echo("auth is on: create a key with `distill keys create --tenant NAME`")
        typer.echo("press Ctrl-C to stop")
        _wait(children)
    except KeyboardInterrupt:
        typer.echo("stopping…")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second one must not cut the stop short
            signal.signal(sig, signal.SIG_IGN)
        _stop(children)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _check_port_free(host: str, port: int) -> None:
    """Exit with one clear line when ``host:port`` cannot be bound (before starting anything)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        # As uvicorn binds: SO_REUSEADDR, so a port in TIME_WAIT is not mistaken for taken.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            typer.echo(
                f"error: cannot listen on {host}:{port} ({exc.strerror or exc}); another "
                f"program (an earlier `distill serve`?) uses it. Stop it, or choose another "
                f"port: `distill serve --port {port + 10}` (`make serve PORT={port + 10}`)",
                err=True,
            )
            raise typer.Exit(1) from None


def _wait_until_up(
    url: str, children: dict[str, subprocess.Popen[bytes]], timeout: float = 120.0
) -> None:
    """Block until the API answers ``/healthz``; a child that exits first stops the service."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _check_alive(children)
        try:
            # trust_env=False: a proxy from the environment must not answer for localhost.
            if httpx.get(f"{url}/healthz", timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    typer.echo(f"the API did not answer {url}/healthz within {timeout:.0f} s", err=True)
    raise typer.Exit(1)


def _check_alive(children: dict[str, subprocess.Popen[bytes]]) -> None:
    for name, proc in children.items():
        code = proc.poll()
        if code is not None:
            typer.echo(f"{name} exited with code {code}; stopping the service", err=True)
            raise typer.Exit(1)


def _wait(children: dict[str, subprocess.Popen[bytes]]) -> None:
    """Block until a child exits (then stop the rest), Ctrl-C or SIGTERM."""
    while True:
        _check_alive(children)
        time.sleep(0.5)


def _stop(children: dict[str, subprocess.Popen[bytes]], timeout: float = 10.0) -> None:
    # The worker gets SIGQUIT (Celery's cold shutdown): a running job is not waited for; it keeps
    # its last checkpoint and the reconciler re-queues it on the next start.
    signals = {"worker": signal.SIGQUIT}
    for name, proc in children.items():
        if proc.poll() is None:
            _signal_group(proc, signals.get(name, signal.SIGTERM))
    deadline = time.monotonic() + timeout
    for proc in children.values():
        try:
            proc.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
