"""The job process: runs the engine, reports to its parent over a pipe as JSON lines.

Started as ``python -m worker.child`` (a new interpreter, never a fork: CUDA cannot be
initialised in a forked child), inside the cage (:mod:`core.distill.cage`) when the worker has
one. Its standard input carries the payload (one JSON line), then ``stop`` when the parent wants
the job to stop; end of input means the parent is gone, and the process exits. Its standard
output carries its messages, one JSON object a line; anything else the job prints goes to
standard error. It speaks JSON only, so the parent never unpickles anything from the process
that opened uploaded files.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from worker.protocol import (
    SERVICE_ENGINE,
    Event,
    Failure,
    JobPayload,
    Message,
    ModelInput,
    Outcome,
    encode,
)


def jsonable(value: Any) -> Any:
    """Plain JSON: non-finite floats → None, arrays and tensors → lists, the rest → text."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "tolist"):  # numpy and torch scalars and arrays
        return jsonable(value.tolist())
    return str(value)


def _listen_to_parent(stop: threading.Event) -> None:
    """Set ``stop`` on a ``stop`` line; exit when the parent closes our input (it is gone)."""

    def listen() -> None:
        for line in sys.stdin:
            if line.strip() == "stop":
                stop.set()
        os._exit(70)  # a worker that is gone must not leave its job running

    threading.Thread(target=listen, name="parent-watch", daemon=True).start()


def _engine(name: str) -> Callable[..., Any]:
    """The engine the payload names: the service's own, imported by name (so that a reader and
    a type checker can follow the call), or a test's stand-in given as ``module:function``."""
    if name == SERVICE_ENGINE:
        from core.distill.pipeline import run_job  # torch and the engine, in the child alone

        return run_job
    module_name, _, func_name = name.partition(":")
    return getattr(importlib.import_module(module_name), func_name)  # type: ignore[no-any-return]


def main() -> None:
    """Entry point of the child: run the payload's engine and send events and the outcome."""
    payload = JobPayload.from_json(sys.stdin.readline())
    # Messages go to the original standard output alone; prints of the job go to stderr.
    channel = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    stop_event = threading.Event()
    _listen_to_parent(stop_event)
    lock = threading.Lock()

    def send(message: Message) -> None:
        data = json.dumps(jsonable(encode(message))).encode() + b"\n"
        with lock:
            channel.write(data)
            channel.flush()

    from worker.tensorboard import open_exporter

    exporter, warning = open_exporter(payload.tensorboard_dir)
    if warning:
        send(Event("log", {"message": warning}))

    def progress(event: Any) -> None:
        if exporter is not None:
            exporter.record(event.type, event.data)
        send(Event(event.type, event.data))

    try:
        engine = _engine(payload.engine)
        outcome = engine(
            _spec(payload.spec),
            models=_models(payload.models),
            dataset=Path(payload.dataset),
            dataset_options=payload.dataset_options,
            out_dir=Path(payload.out_dir),
            work_dir=Path(payload.work_dir),
            progress=progress,
            should_stop=stop_event.is_set,
        )
        artifacts = [
            {"name": a.name, "kind": a.kind, "path": str(a.path)} for a in outcome.artifacts
        ]
        send(Outcome(outcome.result, outcome.history, artifacts))
    except BaseException as exc:  # noqa: BLE001 - every failure becomes the job's error
        error = _error(exc)
        if error.get("code") == "internal":
            traceback.print_exc(file=sys.stderr)
        with contextlib.suppress(Exception):  # the parent is gone; nothing left to tell
            send(Failure(error))
    finally:
        if exporter is not None:
            exporter.close()
        channel.close()


def _error(exc: BaseException) -> dict[str, Any]:
    from core.errors import OutOfMemory, job_error

    if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
        return OutOfMemory(
            "the GPU ran out of memory; use a smaller batch_size or student"
        ).to_dict()
    return job_error(exc)


def _spec(data: dict[str, Any]) -> Any:
    from core.spec import JobSpec

    return JobSpec.model_validate(data)


def _models(data: dict[str, ModelInput]) -> dict[str, Any]:
    from core.distill.types import ModelFile

    return {
        key: ModelFile(path=Path(m.path), format=m.format, arch=m.arch, arch_config=m.arch_config)
        for key, m in data.items()
    }


if __name__ == "__main__":
    main()
    sys.stderr.flush()
    # Skip the interpreter's teardown (a second or more with torch loaded): all is sent.
    os._exit(0)
