"""Blob storage: a local folder (``file:///abs/path``) or an S3-compatible bucket (``s3://b/p``).

Blobs are written by streaming: the sha256 is computed while writing, the size limit is enforced
while writing, and a blob only appears under its key once it is complete (local: a temporary
name renamed into place; S3: a multipart upload, invisible until completed).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import queue
import re
import secrets
import shutil
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from core.errors import PayloadTooLarge

CHUNK = 1024 * 1024
_KEY = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")
_PART = re.compile(r"^\..+\.[0-9a-f]{12}\.part$")  # LocalStorage's name while writing


@dataclass(frozen=True)
class Blob:
    """A stored blob: its key, size in bytes and sha256 (hex)."""

    key: str
    size: int
    sha256: str


def check_key(key: str) -> str:
    """A key is a relative path of safe characters with no ``.`` or ``..`` parts."""
    if not _KEY.match(key) or any(part in (".", "..") for part in key.split("/")):
        raise ValueError(f"invalid storage key {key!r}")
    return key


def _too_large(max_bytes: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"the upload is larger than the limit of {max_bytes} bytes; "
        "send a smaller file or raise DISTILL_MAX_UPLOAD_BYTES",
        details={"max_bytes": max_bytes},
    )


class Storage(ABC):
    """The interface every blob store implements."""

    @abstractmethod
    def put_stream(self, key: str, chunks: Iterable[bytes], *, max_bytes: int) -> Blob:
        """Store the chunks under ``key``; PayloadTooLarge (and nothing stored) past max_bytes."""

    def put_file(self, key: str, path: Path) -> Blob:
        """Store a local file under ``key``."""
        return self.put_stream(key, _read_chunks(Path(path)), max_bytes=Path(path).stat().st_size)

    async def aput_stream(
        self, key: str, chunks: AsyncIterable[bytes], *, max_bytes: int, buffer: int = 16
    ) -> Blob:
        """:meth:`put_stream` fed from an async iterable; the writing happens in a thread.

        At most ``buffer`` chunks wait between the reader and the writer, so memory stays flat
        whatever the size of the stream.
        """
        pipe: queue.SimpleQueue[Any] = queue.SimpleQueue()
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        abort = threading.Event()
        # The reader waits for a free slot, not in sleeps: a reader that polls leaves the socket
        # unread while it sleeps, and the upload runs at a fraction of the disk's speed.
        slots = asyncio.Semaphore(buffer)

        def consume() -> Iterator[bytes]:
            while True:
                item = pipe.get()
                loop.call_soon_threadsafe(slots.release)
                if item is None:
                    return
                if item is _ABORT:
                    raise _Aborted
                yield item

        def write() -> None:
            try:
                blob = self.put_stream(key, consume(), max_bytes=max_bytes)
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting side
                abort.set()
                _drain(pipe)
                loop.call_soon_threadsafe(slots.release)  # a reader waiting for a slot sees abort
                loop.call_soon_threadsafe(_settle, done, None, exc)
            else:
                loop.call_soon_threadsafe(_settle, done, blob, None)

        threading.Thread(target=write, name=f"put-{key}", daemon=True).start()
        try:
            async for chunk in chunks:
                if abort.is_set():
                    break
                if chunk:
                    await _put(pipe, chunk, slots, abort)
            if not abort.is_set():
                await _put(pipe, None, slots, abort)
        except BaseException:
            abort.set()
            _drain(pipe)
            pipe.put(_ABORT)
            with suppress(BaseException):  # the producer's error is the one to report
                await done
            raise
        return await done

    @abstractmethod
    def open_range(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """The bytes ``[start, end)`` of a blob (``end`` None: to the end), in chunks.

        Raises FileNotFoundError at once (not on first iteration) when the blob is missing.
        """

    @abstractmethod
    def size(self, key: str) -> int:
        """The blob's size in bytes; FileNotFoundError when missing."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether a blob is stored under ``key``."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove a blob; removing a missing blob is not an error."""

    @abstractmethod
    def keys(self, prefix: str) -> list[str]:
        """The keys of the complete blobs whose key starts with ``prefix``, sorted."""

    @abstractmethod
    @contextmanager
    def local_copy(self, key: str) -> Iterator[Path]:
        """A path on local disk holding the blob, valid inside the ``with`` block."""

    @abstractmethod
    def check(self) -> None:
        """Raise when the store cannot be reached (used by /readyz)."""


class _Aborted(Exception):
    """The producer of an async stream failed; the writer cleans up."""


_ABORT = object()


def _settle(future: asyncio.Future[Blob], blob: Blob | None, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(blob)  # type: ignore[arg-type]


async def _put(
    pipe: queue.SimpleQueue[Any], item: Any, slots: asyncio.Semaphore, abort: threading.Event
) -> None:
    """Hand an item to the writer once it has room (at most ``buffer`` items wait)."""
    await slots.acquire()
    if not abort.is_set():
        pipe.put(item)


def _drain(pipe: queue.SimpleQueue[Any]) -> None:
    try:
        while True:
            pipe.get_nowait()
    except queue.Empty:
        pass


def _read_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


def _public(key: str) -> bool:
    """Not the temporary file of an unfinished local write."""
    return not _PART.match(key.rpartition("/")[2])


def _suffix(key: str) -> str:
    return Path(key).suffix if len(Path(key).suffix) <= 16 else ""


class LocalStorage(Storage):
    """Blobs as files under a root folder."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put_stream(self, key: str, chunks: Iterable[bytes], *, max_bytes: int) -> Blob:
        final = self.path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.{secrets.token_hex(6)}.part")
        digest, size = hashlib.sha256(), 0
        try:
            with tmp.open("wb") as f:
                for chunk in chunks:
                    size += len(chunk)
                    if size > max_bytes:
                        raise _too_large(max_bytes)
                    digest.update(chunk)
                    f.write(chunk)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return Blob(key=key, size=size, sha256=digest.hexdigest())

    def open_range(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        f = self.path(key).open("rb")
        return self._iter(f, start, end)

    @staticmethod
    def _iter(f: Any, start: int, end: int | None) -> Iterator[bytes]:
        with f:
            f.seek(start)
            left = None if end is None else max(end - start, 0)
            while left is None or left > 0:
                chunk = f.read(CHUNK if left is None else min(CHUNK, left))
                if not chunk:
                    return
                if left is not None:
                    left -= len(chunk)
                yield chunk

    def size(self, key: str) -> int:
        return self.path(key).stat().st_size

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def keys(self, prefix: str) -> list[str]:
        # Walk only the folder the prefix names; unfinished writes are hidden ".…part" files.
        parent = prefix.rpartition("/")[0]
        folder = self.path(parent) if parent else self.root
        if not folder.is_dir():
            return []
        found = (p.relative_to(self.root).as_posix() for p in folder.rglob("*") if p.is_file())
        return sorted(k for k in found if k.startswith(prefix) and _KEY.match(k) and _public(k))

    @contextmanager
    def local_copy(self, key: str) -> Iterator[Path]:
        path = self.path(key)
        if not path.is_file():
            raise FileNotFoundError(f"no blob stored under {key!r}")
        yield path

    def check(self) -> None:
        if not self.root.is_dir() or not os.access(self.root, os.W_OK):
            raise OSError(f"storage folder {self.root} is missing or not writable")


class S3Storage(Storage):
    """Blobs as objects in an S3-compatible bucket, under an optional prefix."""

    PART_SIZE = 8 * 1024 * 1024  # S3 needs parts of at least 5 MiB, except the last

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            config=Config(retries={"max_attempts": 3, "mode": "standard"}),
        )

    def _name(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put_stream(self, key: str, chunks: Iterable[bytes], *, max_bytes: int) -> Blob:
        name = self._name(key)
        digest, size = hashlib.sha256(), 0
        buf = bytearray()
        upload_id: str | None = None
        parts: list[dict[str, Any]] = []
        try:
            for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise _too_large(max_bytes)
                digest.update(chunk)
                buf += chunk
                while len(buf) >= self.PART_SIZE:
                    if upload_id is None:
                        upload_id = self.client.create_multipart_upload(
                            Bucket=self.bucket, Key=name
                        )["UploadId"]
                    part, buf = bytes(buf[: self.PART_SIZE]), buf[self.PART_SIZE :]
                    parts.append(self._upload_part(name, upload_id, len(parts) + 1, part))
            if upload_id is None:
                self.client.put_object(Bucket=self.bucket, Key=name, Body=bytes(buf))
            else:
                if buf:
                    parts.append(self._upload_part(name, upload_id, len(parts) + 1, bytes(buf)))
                self.client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=name,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                )
        except BaseException:
            if upload_id is not None:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=name, UploadId=upload_id)
            raise
        return Blob(key=key, size=size, sha256=digest.hexdigest())

    def _upload_part(self, name: str, upload_id: str, number: int, data: bytes) -> dict[str, Any]:
        response = self.client.upload_part(
            Bucket=self.bucket, Key=name, UploadId=upload_id, PartNumber=number, Body=data
        )
        return {"PartNumber": number, "ETag": response["ETag"]}

    def open_range(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        if end is not None and end <= start:
            self.size(key)  # still report a missing blob
            return iter(())
        byte_range = f"bytes={start}-" + ("" if end is None else str(end - 1))
        try:
            response = self.client.get_object(
                Bucket=self.bucket, Key=self._name(key), Range=byte_range
            )
        except self.client.exceptions.NoSuchKey:
            raise FileNotFoundError(f"no blob stored under {key!r}") from None
        except self.client.exceptions.ClientError as exc:
            if _status(exc) == 416:  # a range starting at the end of the object
                return iter(())
            raise
        return self._iter(response["Body"])

    @staticmethod
    def _iter(body: Any) -> Iterator[bytes]:
        try:
            yield from body.iter_chunks(CHUNK)
        finally:
            body.close()

    def size(self, key: str) -> int:
        try:
            return int(
                self.client.head_object(Bucket=self.bucket, Key=self._name(key))["ContentLength"]
            )
        except self.client.exceptions.ClientError as exc:
            if _status(exc) == 404:
                raise FileNotFoundError(f"no blob stored under {key!r}") from None
            raise

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except FileNotFoundError:
            return False
        return True

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._name(key))

    def keys(self, prefix: str) -> list[str]:
        start = f"{self.prefix}/" if self.prefix else ""
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=start + prefix
        )
        return sorted(
            obj["Key"][len(start) :] for page in pages for obj in page.get("Contents", [])
        )

    @contextmanager
    def local_copy(self, key: str) -> Iterator[Path]:
        folder = Path(tempfile.mkdtemp(prefix="distill-blob-"))
        try:
            path = folder / f"blob{_suffix(key)}"
            with path.open("wb") as f:
                for chunk in self.open_range(key):
                    f.write(chunk)
            yield path
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def check(self) -> None:
        self.client.head_bucket(Bucket=self.bucket)


def _status(exc: Any) -> int | None:
    return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def get_storage(url: str, *, s3_endpoint_url: str | None = None) -> Storage:
    """The store for a URL: ``file:///abs/path`` or ``s3://bucket[/prefix]``."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"storage URL {url!r}: use file:///absolute/path (three slashes)")
        return LocalStorage(Path(unquote(parsed.path)))
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"storage URL {url!r} names no bucket; use s3://bucket/prefix")
        return S3Storage(parsed.netloc, parsed.path, endpoint_url=s3_endpoint_url)
    raise ValueError(f"storage URL {url!r}: use file:///absolute/path or s3://bucket/prefix")
