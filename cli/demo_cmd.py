"""`distill demo`: the whole product in one command, on the digits that ship with scikit-learn.

Trains a small CNN teacher, starts the service (`distill serve` on a free port with a temporary
data folder) unless one answers at ``--url``, uploads the teacher and a transfer set where only
100 training images keep their labels, distils an MLP student, shows the teacher vs student vs
labels-only baseline table, downloads the student, and stops what it started.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console

from cli.app import app
from client.errors import DistillAPIError

LABELLED = 100  # training images that keep their label; the rest are the unlabeled transfer set
START_TIMEOUT_SECONDS = 120.0

err = Console(stderr=True, highlight=False)


def demo_spec(teacher_id: str, dataset_id: str, epochs: int) -> dict[str, Any]:
    """The demo's job: a KD'd MLP, with the labels-only baseline beside it."""
    return {
        "name": "demo-digits-cnn-to-mlp",
        "teacher": {"model_id": teacher_id},
        "dataset_id": dataset_id,
        "student": {"preset": "mlp", "width": 64, "depth": 1},
        "distillation": {"method": "kd", "temperature": 4.0, "alpha": 0.9},
        "training": {"epochs": epochs, "batch_size": 64, "lr": 0.003, "seed": 0},
        "export": ["torchscript", "onnx", "safetensors"],
    }


def answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def embedded_service(data_dir: Path, log_path: Path) -> Iterator[str]:
    """`distill serve` on a free port with auth off; its URL; stopped (with its children) after."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILL_")}
    env.update(DISTILL_AUTH="off", DISTILL_DATA_DIR=str(data_dir), PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "cli", "serve", "--port", str(port)]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not answers(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the embedded service did not start:\n{tail}")
            time.sleep(0.3)
        yield url
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    # SIGINT is `distill serve`'s Ctrl-C: it stops its API, worker and reconciler in order.
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


@app.command()
def demo(
    url: Annotated[
        str | None,
        typer.Option(envvar="DISTILL_URL", help="Use the service here when one answers."),
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(envvar="DISTILL_API_KEY", help="API key for --url.")
    ] = None,
    out: Annotated[Path, typer.Option(help="Folder for the files and the student.")] = Path(
        "distill-demo"
    ),
    epochs: Annotated[int, typer.Option(min=1, help="Student training epochs.")] = 20,
) -> None:
    """Distil a digits CNN into a small MLP on the service, end to end, in about a minute."""
    import warnings

    from cli.digits import make_files
    from cli.remote import api_failure, fail
    from cli.render import render_result
    from client.sdk import Client

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    out = out.resolve()
    err.print("[bold]1/5[/bold] training a teacher (a small CNN on sklearn's digits) …")
    teacher_path, data_path, teacher_acc = make_files(out / "inputs", labelled=LABELLED)
    err.print(f"     teacher validation accuracy {100 * teacher_acc:.1f} %")

    with contextlib.ExitStack() as stack:
        base = (url or "http://127.0.0.1:8000").rstrip("/")
        if answers(base):
            err.print(f"[bold]2/5[/bold] using the service at {base}")
        else:
            temp = Path(tempfile.mkdtemp(prefix="distill-demo-"))
            stack.callback(shutil.rmtree, temp, ignore_errors=True)
            err.print("[bold]2/5[/bold] starting the service (`distill serve`) …")
            base = stack.enter_context(embedded_service(temp / "data", out / "serve.log"))
            api_key = None
            err.print(f"     running at {base} (log: {out / 'serve.log'})")
        client = stack.enter_context(Client(base, api_key))
        try:
            err.print("[bold]3/5[/bold] uploading the teacher and the transfer set …")
            teacher = client.models.upload(teacher_path, name="demo-digits-cnn")
            dataset = client.datasets.upload(data_path, name="demo-digits")
            err.print(
                f"     {teacher.id} ({teacher.parameters:,} parameters), {dataset.id} "
                f"({dataset.n_samples:,} images, {LABELLED} labelled)"
            )
            err.print(f"[bold]4/5[/bold] distilling an MLP student ({epochs} epochs) …")
            job = client.jobs.create(demo_spec(teacher.id, dataset.id, epochs)).wait()
            if job.status != "succeeded":
                error = job.error or {}
                fail(error.get("code") or job.status, error.get("message") or job.status)
            Console().print(render_result(job.result or {}))
            err.print(f"[bold]5/5[/bold] downloading the student into {out / 'student'} …")
            for artifact in client.jobs.artifacts(job.id):
                path = client.artifacts.download(artifact.id, out / "student" / artifact.name)
                err.print(f"     {path.relative_to(out)}")
        except DistillAPIError as exc:
            api_failure(exc)
    err.print(f"done: job {job.id}; files in {out}")
