"""A job's checkpoints in storage, so that a re-queued job resumes on any worker.

The engine writes ``*.pt`` files under its work folder; they are uploaded under
``jobs/<id>/checkpoints/`` with a manifest naming them (the store has no listing), brought back
before a run, and deleted once the job is terminal.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

log = logging.getLogger(__name__)


def checkpoint_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/checkpoints/"


def download(storage: Any, key: str, dest: Path) -> None:
    """Copy a blob to a local file."""
    with storage.local_copy(key) as src:
        shutil.copyfile(src, dest)


def _manifest_key(job_id: str) -> str:
    return checkpoint_prefix(job_id) + "manifest.json"


def _read_manifest(storage: Any, job_id: str) -> list[str]:
    key = _manifest_key(job_id)
    if not storage.exists(key):
        return []
    with storage.local_copy(key) as path:
        names = json.loads(Path(path).read_text())
    # Names come from our own manifest, but never let one escape the work folder.
    return [n for n in names if isinstance(n, str) and ".." not in Path(n).parts]


class NotInside(Exception):
    """A path the job process controls leads outside its folder (a link) or to no plain file."""


def open_inside(path: Path, folder: Path) -> BinaryIO:
    """Open a file the job process wrote, only if it is a plain file inside ``folder``.

    The job process may replace a checkpoint with a link to a file of the worker's host while
    we look: the file is opened without following a final link, and the path it was really
    opened at is checked afterwards.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # the final part is a link
            raise NotInside(str(path)) from None
        raise
    try:
        real = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if not stat.S_ISREG(os.fstat(fd).st_mode) or not real.is_relative_to(folder.resolve()):
            raise NotInside(str(path))
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def restore_checkpoints(storage: Any, job_id: str, work_dir: Path) -> None:
    """Bring back the checkpoints an earlier attempt uploaded, so the engine resumes."""
    for name in _read_manifest(storage, job_id):
        dest = work_dir / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        download(storage, checkpoint_prefix(job_id) + name, dest)


def sync_checkpoints(storage: Any, job_id: str, work_dir: Path, seen: dict[str, Any]) -> None:
    """Upload ``*.pt`` files that are new or changed since the last sync; then the manifest.

    The engine writes each checkpoint to a temporary name and renames it into place, so a
    ``*.pt`` file is always complete; it is copied through one open handle (a consistent
    snapshot even if the next epoch's checkpoint replaces it meanwhile) and that copy uploaded.
    """
    if not work_dir.exists():
        return
    changed = False
    for path in sorted(work_dir.rglob("*.pt")):
        name = path.relative_to(work_dir).as_posix()
        try:
            with open_inside(path, work_dir) as src:
                stat = os.fstat(src.fileno())
                signature = (stat.st_mtime_ns, stat.st_size)
                if seen.get(name) == signature:
                    continue
                with tempfile.NamedTemporaryFile(dir=work_dir.parent, delete=False) as snap:
                    shutil.copyfileobj(src, snap)
        except FileNotFoundError:
            continue  # replaced between the listing and the open; the next sync takes it
        except NotInside:
            log.warning("checkpoint %s of %s is not a file of its folder; skipped", name, job_id)
            continue
        try:
            storage.put_file(checkpoint_prefix(job_id) + name, Path(snap.name))
        finally:
            Path(snap.name).unlink(missing_ok=True)
        seen[name] = signature
        changed = True
    if changed:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as tmp:
            json.dump(sorted(seen), tmp)
        try:
            storage.put_file(_manifest_key(job_id), Path(tmp.name))
        finally:
            Path(tmp.name).unlink(missing_ok=True)


def delete_checkpoints(storage: Any, job_id: str) -> None:
    """Remove a finished job's checkpoints from storage."""
    try:
        for name in _read_manifest(storage, job_id):
            storage.delete(checkpoint_prefix(job_id) + name)
        if storage.exists(_manifest_key(job_id)):
            storage.delete(_manifest_key(job_id))
    except Exception:  # noqa: BLE001 - leftovers cost space, not correctness
        log.warning("could not delete the checkpoints of %s", job_id, exc_info=True)
