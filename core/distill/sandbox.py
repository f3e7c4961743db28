"""Run one function on untrusted input in a fresh, limited child process.

:func:`run_sandboxed` starts ``python -m core.distill.sandbox`` (a new interpreter, never a fork
of the caller), limits its address space (``RLIMIT_AS``) and CPU time, and waits at most
``timeout_s`` of wall time. Arguments go in and results come back as JSON, so nothing the child
produces is unpickled by the caller. A :class:`~core.errors.DistillError` raised in the child is
raised again in the caller as the same class (matched by ``code``).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import resource
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from core.errors import DistillError, InvalidSpec, ModelInvalid

_ROOT = Path(__file__).resolve().parents[2]  # the folder holding the `core` package
_MEMORY_WORDS = ("can't allocate memory", "bad_alloc", "out of memory", "cannot allocate memory")
_STDERR_TAIL = 2000


def run_sandboxed(
    func_path: str,
    args: dict[str, Any],
    *,
    timeout_s: float,
    memory_mb: int,
    error_class: type[DistillError] = ModelInvalid,
) -> Any:
    """Call ``module:function(**args)`` in a limited child process and return its JSON result.

    Exceeding ``timeout_s`` or ``memory_mb`` raises ``error_class`` (ModelInvalid by default)
    saying which limit was hit.
    """
    request = json.dumps({"func": func_path, "args": args})
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        OPENBLAS_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(p for p in (str(_ROOT), env.get("PYTHONPATH")) if p),
        DISTILL_SANDBOX_MEMORY_MB=str(int(memory_mb)),
        DISTILL_SANDBOX_CPU_S=str(math.ceil(timeout_s) + 1),
    )
    with tempfile.TemporaryDirectory(prefix="distill-sandbox-") as tmp:
        result_path = Path(tmp) / "result.json"
        proc = subprocess.Popen(
            [sys.executable, "-m", "core.distill.sandbox", str(result_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=tmp,
            env=env,
            start_new_session=True,  # its own process group, so a kill reaches its children
        )
        try:
            _, stderr = proc.communicate(request.encode(), timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill(proc)
            raise error_class(
                f"opening the file took longer than {timeout_s:g} s and was stopped; check that "
                "the model's forward pass finishes, or make the file smaller"
            ) from None
        finally:
            _kill(proc)
        payload = _read_result(result_path)
    if payload is None:
        return _no_result(proc.returncode, stderr, timeout_s, memory_mb, error_class)
    if payload.get("ok"):
        return payload.get("result")
    if payload.get("memory"):
        raise error_class(_memory_message(memory_mb))
    raise _rebuild_error(payload.get("error") or {})


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


def _apply_limits() -> None:
    memory_mb = int(os.environ.get("DISTILL_SANDBOX_MEMORY_MB", "0"))
    cpu_s = int(os.environ.get("DISTILL_SANDBOX_CPU_S", "0"))
    if memory_mb > 0:
        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    if cpu_s > 0:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 5))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _call(func_path: str, args: dict[str, Any]) -> Any:
    module_name, _, func_name = func_path.partition(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return func(**args)


def _is_memory_error(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or any(w in str(exc).lower() for w in _MEMORY_WORDS)


def main(argv: list[str]) -> int:
    """Child entry point: read {"func", "args"} from stdin, write {"ok", …} to argv[1]."""
    result_path = Path(argv[1])
    _apply_limits()
    request = json.loads(sys.stdin.read())
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
    sys.exit(main(sys.argv))
