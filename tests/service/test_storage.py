"""Blob storage: the local folder store and the S3 store (against a moto S3 server)."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from core.errors import PayloadTooLarge
from core.storage import LocalStorage, S3Storage, Storage, get_storage
from tests.service.helpers import free_port

BUCKET = "distill-test"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    server_mod = pytest.importorskip("moto.server", reason="moto[server] is not installed")
    port = free_port()
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return get_storage(f"file://{tmp_path / 'blobs'}")
    endpoint = request.getfixturevalue("s3_endpoint")
    request.getfixturevalue("aws_env")
    bucket = f"{BUCKET}-{os.urandom(4).hex()}"
    storage = get_storage(f"s3://{bucket}/some/prefix", s3_endpoint_url=endpoint)
    assert isinstance(storage, S3Storage)
    storage.client.create_bucket(Bucket=bucket)
    storage.PART_SIZE = 5 * 1024 * 1024  # the S3 minimum, to exercise multipart with less data
    return storage


def _leftovers(store: Storage) -> list[str]:
    """Everything stored (files, objects, unfinished multipart uploads)."""
    if isinstance(store, LocalStorage):
        return [str(p) for p in store.root.rglob("*") if p.is_file()]
    assert isinstance(store, S3Storage)
    objects = store.client.list_objects_v2(Bucket=store.bucket).get("Contents", [])
    uploads = store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", [])
    return [o["Key"] for o in objects] + [u["Key"] for u in uploads]


def _chunks(data: bytes, size: int = 1024 * 1024) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def test_put_stream_then_read_back(store: Storage) -> None:
    data = os.urandom(12 * 1024 * 1024 + 7)  # several multipart parts on S3
    blob = store.put_stream("models/t1/m.pt2", _chunks(data), max_bytes=len(data))
    assert blob.key == "models/t1/m.pt2"
    assert blob.size == len(data) and blob.sha256 == hashlib.sha256(data).hexdigest()
    assert store.exists(blob.key) and store.size(blob.key) == len(data)
    assert b"".join(store.open_range(blob.key)) == data
    assert b"".join(store.open_range(blob.key, 5, 5_000_000)) == data[5:5_000_000]
    assert b"".join(store.open_range(blob.key, len(data) - 3)) == data[-3:]
    assert b"".join(store.open_range(blob.key, 10, 10)) == b""
    with store.local_copy(blob.key) as path:
        assert path.read_bytes() == data and path.suffix == ".pt2"
    store.delete(blob.key)
    store.delete(blob.key)  # deleting twice is fine
    assert not store.exists(blob.key)
    assert _leftovers(store) == []


def test_small_blobs_and_empty_blobs(store: Storage) -> None:
    assert store.put_stream("a/b.json", [b'{"x": ', b"1}"], max_bytes=100).size == 8
    assert b"".join(store.open_range("a/b.json")) == b'{"x": 1}'
    empty = store.put_stream("a/empty", [], max_bytes=100)
    assert empty.size == 0 and empty.sha256 == hashlib.sha256(b"").hexdigest()
    assert store.exists("a/empty") and b"".join(store.open_range("a/empty")) == b""


def test_over_the_limit_leaves_nothing(store: Storage) -> None:
    data = os.urandom(11 * 1024 * 1024)
    with pytest.raises(PayloadTooLarge) as info:
        store.put_stream("big/file", _chunks(data), max_bytes=10 * 1024 * 1024)
    assert info.value.http_status == 413 and "DISTILL_MAX_UPLOAD_BYTES" in info.value.message
    assert not store.exists("big/file")
    assert _leftovers(store) == []


def test_a_failing_producer_leaves_nothing(store: Storage) -> None:
    def broken() -> Iterator[bytes]:
        yield os.urandom(6 * 1024 * 1024)
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        store.put_stream("x/y", broken(), max_bytes=10**9)
    assert _leftovers(store) == []


def test_replacing_a_blob_is_atomic(store: Storage) -> None:
    store.put_stream("k", [b"old"], max_bytes=10)
    with pytest.raises(PayloadTooLarge):
        store.put_stream("k", [b"new but too long"], max_bytes=10)
    assert b"".join(store.open_range("k")) == b"old"


def test_missing_blobs(store: Storage) -> None:
    assert not store.exists("no/such")
    with pytest.raises(FileNotFoundError):
        store.size("no/such")
    with pytest.raises(FileNotFoundError):
        store.open_range("no/such")
    with pytest.raises(FileNotFoundError), store.local_copy("no/such"):
        pass


def test_keys_lists_complete_blobs_by_prefix(store: Storage) -> None:
    for key in ("lm/t1/ab-1/meta.json", "lm/t1/ab-1/values", "lm/t1/ab-2", "lm/t1/cd", "lm/t2/ab"):
        store.put_stream(key, [b"x"], max_bytes=1)
    with pytest.raises(PayloadTooLarge):  # a failed write is never listed
        store.put_stream("lm/t1/ab-3", [b"too long"], max_bytes=1)
    if isinstance(store, LocalStorage):  # nor one being written (under a temporary name)
        (store.root / "lm/t1/.ab-4.0123456789ab.part").write_bytes(b"x")
    assert store.keys("lm/t1/ab-") == ["lm/t1/ab-1/meta.json", "lm/t1/ab-1/values", "lm/t1/ab-2"]
    assert store.keys("lm/t1/") == [*store.keys("lm/t1/ab-"), "lm/t1/cd"]
    assert store.keys("lm/t3/") == [] and store.keys("none") == []


def test_put_file(store: Storage, tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    path.write_bytes(b'{"accuracy": 0.97}')
    blob = store.put_file("artifacts/j/report.json", path)
    assert blob.size == path.stat().st_size
    assert b"".join(store.open_range(blob.key)) == path.read_bytes()


def test_async_stream_with_backpressure(store: Storage) -> None:
    data = os.urandom(7 * 1024 * 1024)

    async def produce() -> AsyncIterator[bytes]:
        for chunk in _chunks(data, 64 * 1024):
            await asyncio.sleep(0)
            yield chunk

    blob = asyncio.run(store.aput_stream("async/blob", produce(), max_bytes=len(data), buffer=4))
    assert blob.sha256 == hashlib.sha256(data).hexdigest()
    assert b"".join(store.open_range("async/blob")) == data


def test_async_stream_errors_leave_nothing(store: Storage) -> None:
    async def too_long() -> AsyncIterator[bytes]:
        for _ in range(100):
            yield b"z" * 65536

    with pytest.raises(PayloadTooLarge):
        asyncio.run(store.aput_stream("async/big", too_long(), max_bytes=1_000_000))

    async def broken() -> AsyncIterator[bytes]:
        yield b"a" * 65536
        raise ConnectionResetError("gone")

    with pytest.raises(ConnectionResetError):
        asyncio.run(store.aput_stream("async/broken", broken(), max_bytes=10**9))
    assert _leftovers(store) == []


def test_check(store: Storage) -> None:
    store.check()


def test_check_fails_when_unreachable(tmp_path: Path, s3_endpoint: str, aws_env: None) -> None:
    local = get_storage(f"file://{tmp_path / 'gone'}")
    (tmp_path / "gone").rmdir()
    with pytest.raises(OSError):
        local.check()
    with pytest.raises(Exception, match="404|Not Found|NoSuchBucket"):
        get_storage("s3://no-such-bucket", s3_endpoint_url=s3_endpoint).check()


@pytest.mark.parametrize(
    "key", ["../etc/passwd", "/abs", "a/../b", "a//b", "a/./b", "sp ace", "", "a\\b"]
)
def test_unsafe_keys_are_refused(tmp_path: Path, key: str) -> None:
    store = get_storage(f"file://{tmp_path}")
    with pytest.raises(ValueError, match="invalid storage key"):
        store.put_stream(key, [b"x"], max_bytes=10)


@pytest.mark.parametrize(
    "url", ["ftp://host/x", "file://host/x", "s3://", "/just/a/path", "s3:///prefix"]
)
def test_bad_storage_urls(url: str) -> None:
    with pytest.raises(ValueError, match="storage URL"):
        get_storage(url)
