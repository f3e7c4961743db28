"""The cage: how a process that opens an uploaded model is started.

An uploaded model is a program (a TorchScript or ``torch.export`` graph can call file
operators), so every process that opens one runs under bubblewrap (``bwrap``) with:

- its own network, PID, IPC and UTS namespaces: no socket reaches the host's services, and no
  other process is visible;
- an unprivileged uid/gid (65534) and no capabilities;
- an empty root file system holding only the system libraries, the Python runtime and the
  project's packages, read-only; the inputs of this one call, read-only; one writable scratch
  folder; a private ``/tmp``. No data dir, database file or other tenant's blob is in it;
- an environment reduced to an allowlist (no database, broker or storage URL, no cloud key);
- limits on processes, open files and the size of any file written (``prlimit``); memory and
  CPU time are limited by the process itself before it reads its input (RLIMIT_AS/CPU) or by
  the worker's supervision (RSS sampling).

How the uid is made unprivileged depends on who runs the service. As root (a bare machine), bwrap
sets the cage up in new namespaces and ``setpriv`` drops to uid 65534 before the interpreter
starts, so the process is unprivileged on the host as well. As any other user (the container
image runs as ``distill``), bwrap makes a user namespace and maps uid 65534 inside to that user
outside. Either way the inputs the cage must read are made readable to it with
:func:`share_read_only`, and the scratch folder is handed to it with :func:`share_writable`.

:func:`cage_problem` says why a cage cannot be built here (no bwrap, no namespaces); callers then
refuse the formats that are programs unless the operator turned the cage off explicitly.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

CAGE_UID = 65534  # "nobody"
PROJECT_PACKAGES = ("core", "worker")
PROGRAM_FORMATS = ("torchscript", "exported_program")  # model files that are programs

# The host directories every Python process needs; bound read-only where they exist.
_SYSTEM_DIRS = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin")
_SYSTEM_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf")
# Variables passed through from the parent when set: none of them is a secret.
_PASS_ENV = (
    "CUDA_VISIBLE_DEVICES",
    "NVIDIA_VISIBLE_DEVICES",
    "OPENBLAS_CORETYPE",
    "OPENBLAS_L2_SIZE",
    "TZ",
)
_ROOT = Path(__file__).resolve().parents[2]  # the folder holding the `core` package


@dataclass(frozen=True)
class CageLimits:
    """Limits every process in one cage shares (threads count as processes)."""

    processes: int = 512
    open_files: int = 1024
    file_mb: int = 8192  # the largest single file it may write
    tmp_mb: int = 1024  # its private /tmp (memory-backed)


def bwrap_path() -> str | None:
    """The bubblewrap binary (``DISTILL_CAGE_BWRAP`` overrides the one on PATH)."""
    configured = os.environ.get("DISTILL_CAGE_BWRAP")
    if configured:
        return configured if os.access(configured, os.X_OK) else None
    return shutil.which("bwrap")


@functools.cache
def _problem(bwrap: str | None, uid: int) -> str | None:
    if bwrap is None:
        return "bubblewrap (bwrap) is not installed: apt-get install bubblewrap"
    argv = command(["/bin/true"], scratch=None, bwrap=bwrap, code_packages=())
    try:
        done = subprocess.run(argv, capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bubblewrap could not start: {exc}"
    if done.returncode != 0:
        reason = done.stderr.decode(errors="replace").strip().splitlines()
        return "bubblewrap could not build a cage here" + (f": {reason[-1]}" if reason else "")
    return None


def cage_problem() -> str | None:
    """Why no cage can be built on this machine, or None when one can (checked once)."""
    return _problem(bwrap_path(), os.getuid())


@dataclass(frozen=True)
class Isolation:
    """How uploaded files are opened here: caged, or not and why, and whether programs may run."""

    caged: bool
    programs_allowed: bool
    reason: str | None = None  # why there is no cage

    def refuse_program(self, fmt: str) -> str | None:
        """The refusal for a model of format ``fmt``, or None when it may be opened."""
        if fmt not in PROGRAM_FORMATS or self.programs_allowed:
            return None
        return (
            f"this server does not open {fmt} models: they are programs, and it has no cage to "
            f"run them in ({self.reason}); upload the model as ONNX (torch.onnx.export) or as "
            "safetensors plus a built-in 'arch', or ask the operator to install bubblewrap"
        )


def isolation(setting: str = "on") -> Isolation:
    """The isolation the setting ``DISTILL_CAGE`` (``on`` or ``off``) gives on this machine.

    ``on``: caged when a cage can be built; otherwise uncaged, and the formats that are
    programs are refused. ``off``: the operator's explicit choice to run uploads uncaged.
    """
    if setting == "off":
        return Isolation(caged=False, programs_allowed=True, reason="DISTILL_CAGE=off")
    problem = cage_problem()
    if problem is None:
        return Isolation(caged=True, programs_allowed=True)
    return Isolation(caged=False, programs_allowed=False, reason=problem)


def exit_status(returncode: int) -> int:
    """A caged process's exit status as :mod:`subprocess` reports an uncaged one: bwrap exits
    with 128 + N when its child was killed by signal N; that becomes -N."""
    return -(returncode - 128) if 128 < returncode < 128 + 65 else returncode


def cage_uid() -> int:
    """The uid the caged process has on the host (the cage's own when we are root)."""
    return CAGE_UID if os.getuid() == 0 else os.getuid()


def share_writable(path: Path) -> None:
    """Make a folder, and what is in it, the cage's own (needed only when we are root)."""
    if os.getuid() != 0:
        return
    os.chown(path, CAGE_UID, CAGE_UID)
    for inner in Path(path).rglob("*"):
        os.chown(inner, CAGE_UID, CAGE_UID, follow_symlinks=False)


def share_read_only(path: Path) -> None:
    """Make a file the cage reads readable by it (a no-op when the cage maps to our own uid)."""
    if os.getuid() == 0:
        mode = path.stat().st_mode
        if not mode & 0o004:
            os.chmod(path, mode | 0o044)


def environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The cage's whole environment: an allowlist, never the parent's."""
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": "/tmp",
        "USER": "nobody",
        "LOGNAME": "nobody",
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONPATH": str(_ROOT),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": "/tmp/hf",
        "TORCHINDUCTOR_CACHE_DIR": "/tmp/inductor",
        "MPLCONFIGDIR": "/tmp/mpl",
    }
    env.update({name: os.environ[name] for name in _PASS_ENV if name in os.environ})
    env.update(extra or {})
    return env


def command(
    argv: Sequence[str],
    *,
    scratch: Path | None,
    read_only: Iterable[Path] = (),
    writable: Iterable[Path] = (),
    env: Mapping[str, str] | None = None,
    limits: CageLimits | None = None,
    code_packages: Sequence[str] = PROJECT_PACKAGES,
    bwrap: str | None = None,
) -> list[str]:
    """The command line that runs ``argv`` in a cage.

    ``scratch`` is the writable working folder (also the current directory); ``read_only`` and
    ``writable`` are further host paths bound at the same place inside. ``code_packages`` are the
    top-level packages of this project the process may import.
    """
    limits = limits or CageLimits()
    bwrap = bwrap or bwrap_path() or "bwrap"
    root = os.getuid() == 0
    args: list[str] = [bwrap, "--die-with-parent", "--new-session"]
    if root:
        # Namespaces without a user namespace; setpriv (below) drops to the cage's uid.
        args += ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts"]
        args += ["--unshare-cgroup-try", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        args += ["--unshare-all", "--disable-userns", "--uid", str(CAGE_UID)]
        args += ["--gid", str(CAGE_UID)]
    made: set[str] = {"/"}

    def parents(path: str) -> None:
        # bwrap makes missing parents 0700, which the cage's uid could not cross: make them 0755.
        for parent in reversed(Path(path).parents):
            text = str(parent)
            if text not in made:
                made.add(text)
                args.extend(["--perms", "0755", "--dir", text])

    def bind(flag: str, path: Path | str) -> None:
        text = str(path)
        parents(text)
        made.add(text)
        args.extend([flag, text, text])

    args += ["--perms", "1777", "--size", str(limits.tmp_mb * 2**20), "--tmpfs", "/tmp"]
    made.add("/tmp")
    args += ["--proc", "/proc", "--dev", "/dev"]
    made.update({"/proc", "/dev"})
    for device in sorted(Path("/dev").glob("nvidia*")):  # GPUs, when the machine has them
        args += ["--dev-bind", str(device), str(device)]
    for name in _SYSTEM_DIRS:
        if Path(name).exists():
            bind("--ro-bind", name)
    for name in _SYSTEM_FILES:
        if Path(name).is_file():
            bind("--ro-bind", name)
    for path in _runtime_paths():
        bind("--ro-bind", path)
    for package in code_packages:
        if (_ROOT / package).is_dir():
            bind("--ro-bind", _ROOT / package)
    for path in read_only:
        bind("--ro-bind", Path(path).resolve())
    for path in writable:
        bind("--bind", Path(path).resolve())
    if scratch is not None:
        bind("--bind", Path(scratch).resolve())
        args += ["--chdir", str(Path(scratch).resolve())]
    args.append("--clearenv")
    for key, value in environment(env).items():
        args += ["--setenv", key, value]
    args.append("--")
    if root:
        args += ["setpriv", f"--reuid={CAGE_UID}", f"--regid={CAGE_UID}", "--clear-groups"]
        args += ["--inh-caps=-all", "--bounding-set=-all", "--"]
    args += list(argv)
    return _with_limits(args, limits)


def _with_limits(args: list[str], limits: CageLimits) -> list[str]:
    # RLIMIT_NPROC counts every process of the uid on the host: allow this many more than now.
    processes = _processes_of(cage_uid()) + limits.processes
    prlimit = shutil.which("prlimit")
    if prlimit is None:
        return args
    return [
        prlimit,
        f"--nproc={processes}:{processes}",
        f"--nofile={limits.open_files}:{limits.open_files}",
        f"--fsize={limits.file_mb * 2**20}:{limits.file_mb * 2**20}",
        "--core=0:0",
        "--",
        *args,
    ]


def _processes_of(uid: int) -> int:
    """Tasks (threads included, as RLIMIT_NPROC counts them) that ``uid`` runs now."""
    count = 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines())
            if int(fields["Uid"].split()[0]) == uid:
                count += int(fields["Threads"])
        except (OSError, ValueError, KeyError):
            continue
    return count


def _runtime_paths() -> list[Path]:
    """The Python installation and the virtualenv, never the project folder (it may hold data)."""
    roots = {Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve()}
    for entry in sys.path:
        path = Path(entry or ".").resolve()
        if "site-packages" in path.parts or "dist-packages" in path.parts:
            roots.add(path)
    outside_system = [
        p for p in roots if p.exists() and not any(p.is_relative_to(s) for s in _SYSTEM_DIRS)
    ]
    # Keep the outermost paths only: binding one inside another would hide nothing but is noise.
    return sorted(
        {p for p in outside_system if not any(p != q and p.is_relative_to(q) for q in roots)}
    )
