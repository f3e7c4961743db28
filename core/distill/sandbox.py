"""Run one function on untrusted input in a fresh, limited, caged child process.

:func:`run_sandboxed` hands the call to ``python -m core.distill.sandbox`` (a new interpreter,
never a fork of the caller, used for this one call) inside the cage of :mod:`core.distill.cage`:
no network, an unprivileged uid, no view of the caller's files but the call's own inputs. The
child limits its address space (``RLIMIT_AS``) and CPU time before it touches the input; the
caller waits at most ``timeout_s`` of wall time. :func:`keep_warm` keeps one such child started,
its imports done, ahead of need.

Each child has a folder of its own: ``in/`` (read-only inside the cage), where the caller places
the call's input files just before the call, and ``out/`` (writable, the child's working
directory), where the child writes its answer. Arguments go in and results come back as JSON,
so nothing the child produces is unpickled by the caller. A :class:`~core.errors.DistillError`
raised in the child is raised again in the caller as the same class (matched by ``code``).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.distill import cage
from core.distill.cage import Isolation
from core.errors import DistillError, InvalidSpec, ModelInvalid

_ROOT = Path(__file__).resolve().parents[2]  # the folder holding the `core` package
_MEMORY_WORDS = ("can't allocate memory", "bad_alloc", "out of memory", "cannot allocate memory")
_STDERR_TAIL = 2000


def run_sandboxed(
    func_path: str,
    args: dict[str, Any],
    *,
    files: dict[str, Path] | None = None,
    timeout_s: float,
    memory_mb: int,
    error_class: type[DistillError] = ModelInvalid,
    isolation: Isolation | None = None,
) -> Any:
    """Call ``module:function(**args)`` in a limited child process and return its JSON result.

    ``files`` maps argument names to input files: each is placed in the child's read-only
    ``in/`` folder and the argument is set to its path there. Exceeding ``timeout_s`` or
    ``memory_mb`` raises ``error_class`` (ModelInvalid by default) saying which limit was hit.
    The child is a spare started ahead of time when :func:`keep_warm` was called, otherwise a
    new one; either way it serves this call alone. ``isolation`` defaults to
    :func:`cage.isolation` of the default policy (caged whenever a cage can be built).
    """
    isolation = isolation or cage.isolation()
    child = _take_child(isolation, _top_package(func_path))
    try:
        call_args = dict(args)
        for name, path in (files or {}).items():
            call_args[name] = str(_place_input(Path(path), child.inbox))
        request = json.dumps(
            {
                "func": func_path,
                "args": call_args,
                "result_path": str(child.result_path),
                "memory_mb": int(memory_mb),
                "cpu_s": math.ceil(timeout_s) + 1,
            }
        )
        try:
            _, stderr = child.proc.communicate(request.encode(), timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill(child.proc)
            raise error_class(
                f"opening the file took longer than {timeout_s:g} s and was stopped; check that "
                "the model's forward pass finishes, or make the file smaller"
            ) from None
        finally:
            _kill(child.proc)
        payload = _read_result(child.result_path)
    finally:
        child.workdir.cleanup()
    if payload is None:
        returncode = child.proc.returncode
        if returncode is not None and child.isolation.caged:
            returncode = cage.exit_status(returncode)
        return _no_result(returncode, stderr, timeout_s, memory_mb, error_class)
    if payload.get("ok"):
        return payload.get("result")
    if payload.get("memory"):
        raise error_class(_memory_message(memory_mb))
    raise _rebuild_error(payload.get("error") or {})


# --- children, started on demand or kept warm ----------------------------------------------------


@dataclass
class _Child:
    proc: subprocess.Popen[bytes]
    workdir: tempfile.TemporaryDirectory[str]
    isolation: Isolation
    package: str

    @property
    def inbox(self) -> Path:
        return Path(self.workdir.name) / "in"

    @property
    def result_path(self) -> Path:
        return Path(self.workdir.name) / "out" / "result.json"


_lock = threading.Lock()
_spare: _Child | None = None
_warm_modules: tuple[str, ...] | None = None  # None: no spare is kept
_warm_isolation: Isolation | None = None


def keep_warm(modules: tuple[str, ...], isolation: Isolation | None = None) -> None:
    """From now on keep one spare child that has already imported ``modules``.

    Starting an interpreter and importing torch takes seconds; a spare makes a call pay only for
    its own work. Each child still serves one call and is then killed.
    """
    global _warm_modules, _warm_isolation, _spare
    with _lock:
        _warm_modules, _warm_isolation = modules, isolation or cage.isolation()
        if _spare is None or _spare.proc.poll() is not None:
            _spare = _spawn(modules, _warm_isolation, "core")


def stop_warm() -> None:
    """Stop keeping a spare and end the one waiting (at shutdown)."""
    global _warm_modules, _spare
    with _lock:
        _warm_modules, spare, _spare = None, _spare, None
    if spare is not None:
        _kill(spare.proc)
        spare.workdir.cleanup()


def _take_child(isolation: Isolation, package: str) -> _Child:
    global _spare
    with _lock:
        child, _spare = _spare, None
        usable = (
            child is not None
            and child.proc.poll() is None
            and (child.isolation, child.package) == (isolation, package)
        )
        if child is not None and not usable:  # it died while waiting, or it is the wrong kind
            _kill(child.proc)
            child.workdir.cleanup()
            child = None
        if child is None:
            child = _spawn(_warm_modules or (), isolation, package)
        if _warm_modules is not None and _warm_isolation is not None:
            _spare = _spawn(_warm_modules, _warm_isolation, "core")
    return child


def _top_package(func_path: str) -> str:
    return func_path.partition(":")[0].split(".")[0]


def _spawn(modules: tuple[str, ...], isolation: Isolation, package: str) -> _Child:
    workdir = tempfile.TemporaryDirectory(prefix="distill-sandbox-")
    inbox, out = Path(workdir.name) / "in", Path(workdir.name) / "out"
    inbox.mkdir()
    out.mkdir()
    argv = [sys.executable, "-m", "core.distill.sandbox", ",".join(modules)]
    threads = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    if isolation.caged:
        cage.share_writable(out)
        packages = tuple(dict.fromkeys((*cage.PROJECT_PACKAGES, package)))
        argv = cage.command(
            argv, scratch=out, read_only=[inbox], env=threads, code_packages=packages
        )
        env = None
    else:
        env = dict(os.environ)
        env.update(threads)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=out,
        env=env,
        start_new_session=True,  # its own process group, so a kill reaches its children
    )
    return _Child(proc, workdir, isolation, package)


def _place_input(path: Path, inbox: Path) -> Path:
    """Put an input file in the child's read-only folder: a hard link when the cage may read
    the file as it is, else a copy it may read."""
    target = inbox / f"{len(list(inbox.iterdir()))}-{path.name}"
    readable = os.getuid() != 0 or path.stat().st_mode & 0o004
    try:
        if not readable:
            raise OSError("a copy is needed")
        os.link(path, target)
    except OSError:
        shutil.copyfile(path, target)
        cage.share_read_only(target)
    return target


atexit.register(stop_warm)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _read_result(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _memory_message(memory_mb: int) -> str:
    return (
        f"opening the file needs more than {memory_mb} MB of memory and was stopped; upload a "
        "smaller model or dataset"
    )


def _no_result(
    returncode: int | None,
    stderr: bytes,
    timeout_s: float,
    memory_mb: int,
    error_class: type[DistillError],
) -> Any:
    tail = stderr.decode(errors="replace")[-_STDERR_TAIL:].strip()
    if returncode == -signal.SIGXCPU:
        raise error_class(
            f"opening the file used more than {timeout_s:g} s of CPU time and was stopped"
        )
    if returncode == -signal.SIGKILL or any(w in tail.lower() for w in _MEMORY_WORDS):
        raise error_class(_memory_message(memory_mb))
    if returncode is not None and returncode < 0:
        name = signal.Signals(-returncode).name
        raise error_class(f"the file crashed the process that opened it ({name})")
    last = tail.splitlines()[-1] if tail else f"exit status {returncode}"
    raise DistillError(f"the sandboxed process failed: {last}")


def _error_classes() -> dict[str, type[DistillError]]:
    classes: dict[str, type[DistillError]] = {}
    stack: list[type[DistillError]] = [DistillError]
    while stack:
        cls = stack.pop()
        classes.setdefault(cls.code, cls)
        stack.extend(cls.__subclasses__())
    return classes


def _rebuild_error(error: dict[str, Any]) -> DistillError:
    cls = _error_classes().get(str(error.get("code")), DistillError)
    message = str(error.get("message") or "the sandboxed process failed")
    details = dict(error.get("details") or {})
    if issubclass(cls, InvalidSpec):
        return cls(message, field=details.get("field"), details=details)
    return cls(message, details=details)


# --- the child ---------------------------------------------------------------------------------


def _apply_limits(memory_mb: int, cpu_s: int) -> None:
    if memory_mb > 0:
        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    if cpu_s > 0:
        # A warm child has already spent CPU time on its imports: the limit is on top of that.
        usage = resource.getrusage(resource.RUSAGE_SELF)
        used = math.ceil(usage.ru_utime + usage.ru_stime)
        resource.setrlimit(resource.RLIMIT_CPU, (used + cpu_s, used + cpu_s + 5))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _call(func_path: str, args: dict[str, Any]) -> Any:
    module_name, _, func_name = func_path.partition(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return func(**args)


def _is_memory_error(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or any(w in str(exc).lower() for w in _MEMORY_WORDS)


def main(argv: list[str]) -> int:
    """Child entry point: import argv[1]'s modules, then serve one request read from stdin.

    The request is {"func", "args", "result_path", "memory_mb", "cpu_s"}; {"ok", …} is written
    to ``result_path``. An empty stdin (the parent stopped keeping this spare) ends the child.
    """
    for module in filter(None, argv[1].split(",") if len(argv) > 1 else []):
        with contextlib.suppress(Exception):  # a module that fails to import fails the call
            importlib.import_module(module)
    text_in = sys.stdin.read()
    if not text_in.strip():
        return 0
    request = json.loads(text_in)
    result_path = Path(request["result_path"])
    _apply_limits(int(request["memory_mb"]), int(request["cpu_s"]))
    try:
        payload: dict[str, Any] = {"ok": True, "result": _call(request["func"], request["args"])}
        text = json.dumps(payload)
    except DistillError as exc:
        text = json.dumps({"ok": False, "error": exc.to_dict()}, default=str)
    except BaseException as exc:  # everything goes back to the caller as JSON
        if _is_memory_error(exc):
            text = json.dumps({"ok": False, "memory": True})
        else:
            message = f"{type(exc).__name__}: {exc}"
            text = json.dumps({"ok": False, "error": {"code": "internal", "message": message}})
    result_path.write_text(text)
    return 0


if __name__ == "__main__":
    status = main(sys.argv)
    sys.stderr.flush()
    # Skip the interpreter's teardown: with torch loaded it takes about a second, and the caller
    # waits for this process to end.
    os._exit(status)
