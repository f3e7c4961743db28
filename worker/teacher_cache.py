"""Causal-LM teacher caches shared through storage, so that no two workers run one teacher twice.

The engine keeps what it computes from a teacher on a dataset (the top-k logit folders and the
``seqkd`` generation files of core/distill/causal) in a per-tenant folder of the worker machine
that the job's cage sees writable. Around each job the worker syncs that folder with storage,
under ``lm-cache/<tenant>/<name>[/<file>]``:

- :func:`fetch`, before the child starts: the stored caches of the job's teachers and dataset
  that this machine lacks, each folder downloaded into a temporary sibling and renamed into
  place, so that the engine never sees a half-downloaded one;
- :func:`publish`, after the child ended: every finished cache of the tenant's folder (a folder
  with its ``meta.json``, a generation file) that is not stored yet, ``meta.json`` last, so a
  stored folder with a ``meta.json`` is complete.

The folder was written by a caged process that ran a stranger's model: only names of the
cache's own forms are uploaded, only plain files (no links: opened without following one and
checked to be inside the folder), at most ``max_bytes`` per cache. The cache is an optimisation:
a failed sync is logged and the job goes on.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.errors import PayloadTooLarge
from core.models import Dataset, Job, Model
from core.spec import JobSpec
from core.storage import Storage
from worker.checkpoints import NotInside, open_inside

log = logging.getLogger(__name__)

PREFIX = "lm-cache"
# core/distill/causal/cache.py cache_key and generate.py generations_key
TOPK_FOLDER = re.compile(r"^[0-9a-f]{24}-[0-9a-f]{24}-L[0-9]{1,7}-k[0-9]{1,7}$")
GENERATIONS = re.compile(r"^seqkd-[0-9a-f]{24}-[0-9a-f]{24}-L[0-9]{1,7}-[0-9a-f]{12}\.jsonl$")
TOPK_FILES = ("values.f16", "indices", "lse.f32")  # then META, the mark of a finished folder
META = "meta.json"
META_MAX_BYTES = 64 * 1024
CHUNK = 1024 * 1024

KeepAlive = Callable[[], None]


class TooLarge(Exception):
    """A cache larger than the worker stores (the job's disk limit)."""


@dataclass(frozen=True)
class CacheInputs:
    """What names a job's caches: its language-model teachers' and its dataset's sha256."""

    teacher_sha256s: list[str]
    dataset_sha256: str


def cache_inputs(session: Session, job: Job) -> CacheInputs | None:
    """The job's Hugging Face teachers and dataset, or None when it has no such teacher."""
    spec = JobSpec.model_validate(job.spec)
    ids = [ref.model_id for ref in spec.teacher_refs() if ref.model_id]
    shas = session.scalars(
        select(Model.sha256).where(
            Model.id.in_(ids), Model.tenant_id == job.tenant_id, Model.format == "hf"
        )
    ).all()
    dataset = session.scalar(
        select(Dataset.sha256).where(
            Dataset.id == spec.dataset_id, Dataset.tenant_id == job.tenant_id
        )
    )
    if not shas or dataset is None:
        return None
    return CacheInputs(sorted(set(shas)), dataset)


def tenant_prefix(tenant_id: str) -> str:
    return f"{PREFIX}/{tenant_id}/"


# --- storage → this machine -----------------------------------------------------------------


def fetch(
    storage: Storage,
    tenant_id: str,
    local: Path,
    inputs: CacheInputs,
    keep_alive: KeepAlive | None = None,
) -> list[str]:
    """Download the stored caches of ``inputs`` that ``local`` lacks; the names brought."""
    prefix = tenant_prefix(tenant_id)
    brought: list[str] = []
    try:
        local.mkdir(parents=True, exist_ok=True)
        for teacher in inputs.teacher_sha256s:
            stem = f"{teacher[:24]}-{inputs.dataset_sha256[:24]}-"
            for name in _stored_folders(storage, prefix, stem):
                if _try(
                    f"fetching {name}", _fetch_folder, storage, prefix, name, local, keep_alive
                ):
                    brought.append(name)
            for key in storage.keys(f"{prefix}seqkd-{stem}"):
                name = key[len(prefix) :]
                if GENERATIONS.match(name) and _try(
                    f"fetching {name}", _fetch_file, storage, key, local / name, keep_alive
                ):
                    brought.append(name)
    except Exception:  # noqa: BLE001 - without the cache the job computes it again
        log.warning("could not fetch the teacher caches of tenant %s", tenant_id, exc_info=True)
    return brought


def _stored_folders(storage: Storage, prefix: str, stem: str) -> list[str]:
    """The finished folders (with their meta.json) stored under ``prefix`` named ``stem…``."""
    names = []
    for key in storage.keys(prefix + stem):
        folder, _, file = key[len(prefix) :].partition("/")
        if file == META and TOPK_FOLDER.match(folder):
            names.append(folder)
    return names


def _fetch_folder(
    storage: Storage, prefix: str, name: str, local: Path, keep_alive: KeepAlive | None
) -> bool:
    if os.path.lexists(local / name):
        return False
    work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=local))
    try:
        for file in (*TOPK_FILES, META):
            _download(storage, f"{prefix}{name}/{file}", work / file, keep_alive)
        try:
            work.rename(local / name)
        except OSError:
            if not os.path.lexists(local / name):
                raise
            shutil.rmtree(work, ignore_errors=True)
            return False  # another job of this machine brought or built it meanwhile
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return True


def _fetch_file(storage: Storage, key: str, dest: Path, keep_alive: KeepAlive | None) -> bool:
    if os.path.lexists(dest):
        return False
    part = dest.with_name(f".{dest.name}.{os.urandom(6).hex()}.part")
    try:
        _download(storage, key, part, keep_alive)
        os.link(part, dest)  # never replaces what is there
    except FileExistsError:
        return False  # another job of this machine brought or wrote it meanwhile
    finally:
        part.unlink(missing_ok=True)
    return True


def _download(storage: Storage, key: str, dest: Path, keep_alive: KeepAlive | None) -> None:
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as out:
        for chunk in storage.open_range(key):
            out.write(chunk)
            if keep_alive is not None:
                keep_alive()


# --- this machine → storage -----------------------------------------------------------------


def publish(storage: Storage, tenant_id: str, local: Path, max_bytes: int) -> list[str]:
    """Upload the finished caches of ``local`` that are not stored yet; the names stored."""
    prefix = tenant_prefix(tenant_id)
    stored: list[str] = []
    try:
        if not local.is_dir():
            return stored
        for entry in sorted(os.scandir(local), key=lambda e: e.name):
            if TOPK_FOLDER.match(entry.name) and entry.is_dir(follow_symlinks=False):
                upload: Callable[..., bool] = _publish_folder
            elif GENERATIONS.match(entry.name) and entry.is_file(follow_symlinks=False):
                upload = _publish_file
            else:
                continue
            if _try(f"storing {entry.name}", upload, storage, prefix, local, entry.name, max_bytes):
                stored.append(entry.name)
    except Exception:  # noqa: BLE001 - the next job computes it again
        log.warning("could not store the teacher caches of tenant %s", tenant_id, exc_info=True)
    return stored


def _publish_folder(storage: Storage, prefix: str, local: Path, name: str, max_bytes: int) -> bool:
    meta_key = f"{prefix}{name}/{META}"
    folder = local / name
    if not (folder / META).exists() or storage.exists(meta_key):
        return False  # unfinished, or stored already
    with ExitStack() as files:
        # Every file is opened (and its size checked) before the first byte goes to storage.
        meta_file = files.enter_context(open_inside(folder / META, local))
        meta = meta_file.read(META_MAX_BYTES + 1)
        if len(meta) > META_MAX_BYTES or _meta_key(meta) != name:
            raise NotInside(f"{folder / META} is not the meta.json of {name}")
        arrays = {f: files.enter_context(open_inside(folder / f, local)) for f in TOPK_FILES}
        size = sum(os.fstat(fh.fileno()).st_size for fh in arrays.values()) + len(meta)
        if size > max_bytes:
            raise TooLarge(f"{name} has {size} bytes, over the limit of {max_bytes}")
        done: list[str] = []
        try:
            for file, fh in arrays.items():
                key = f"{prefix}{name}/{file}"
                # The limit holds even if the job's files grow while they are read.
                size -= storage.put_stream(key, _chunks(fh), max_bytes=size).size
                done.append(key)
            storage.put_stream(meta_key, [meta], max_bytes=META_MAX_BYTES)
        except BaseException:
            with suppress(Exception):
                if not storage.exists(meta_key):  # else another worker stored it meanwhile
                    for key in done:
                        storage.delete(key)
            raise
    return True


def _publish_file(storage: Storage, prefix: str, local: Path, name: str, max_bytes: int) -> bool:
    key = prefix + name
    if storage.exists(key):
        return False
    with open_inside(local / name, local) as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > max_bytes:
            raise TooLarge(f"{name} has {size} bytes, over the limit of {max_bytes}")
        storage.put_stream(key, _chunks(fh), max_bytes=max_bytes)
    return True


def _chunks(fh: BinaryIO) -> Iterator[bytes]:
    while chunk := fh.read(CHUNK):
        yield chunk


def _meta_key(raw: bytes) -> object:
    try:
        meta = json.loads(raw)
    except ValueError:
        return None
    return meta.get("key") if isinstance(meta, dict) else None


def _try(what: str, step: Callable[..., bool], *args: object) -> bool:
    """One cache's sync; a failure (a hostile or broken cache, a storage error) is logged."""
    try:
        return step(*args)
    except (NotInside, TooLarge, PayloadTooLarge) as exc:
        log.warning("teacher cache: %s refused: %s", what, exc)
    except Exception:  # noqa: BLE001 - one bad cache does not stop the others
        log.warning("teacher cache: %s failed", what, exc_info=True)
    return False
