"""The Python SDK of the distill service: ``Client(url, api_key)`` over httpx.

::

    from client.sdk import Client

    with Client("http://127.0.0.1:8000", api_key="dk_…") as distill:
        teacher = distill.models.upload("teacher.pt2", name="digits-cnn")
        data = distill.datasets.upload("digits.npz")
        job = distill.jobs.create({"teacher": {"model_id": teacher.id}, "dataset_id": data.id})
        job = job.wait(progress=True)
        for artifact in job.artifacts():
            distill.artifacts.download(artifact.id, "out/")

Every call raises a :class:`client.errors.DistillAPIError` subclass keyed by the API's error code.
Uploads and downloads are streamed (memory does not grow with the file's size).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import IO, Any, Generic, TypeVar

import httpx

from client.errors import (
    ChecksumMismatch,
    DistillAPIError,
    JobFailed,
    ServiceUnreachable,
    error_from_response,
)

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = ("succeeded", "failed", "cancelled")
CHUNK = 1 << 20
_LOCAL = ("extra", "client")  # dataclass fields that are not part of the API's JSON


# --- objects -------------------------------------------------------------------------------


@dataclass
class Resource:
    """A resource as the API returned it; fields the SDK does not know land in ``extra``."""

    extra: dict[str, Any] = field(default_factory=dict, repr=False, kw_only=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        known = {f.name for f in fields(cls) if f.init and f.name not in _LOCAL}
        obj = cls(**{k: data.get(k) for k in known}, extra={})
        obj.extra = {k: v for k, v in data.items() if k not in known}
        return obj

    def to_dict(self) -> dict[str, Any]:
        """The JSON object this was made from."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _LOCAL}
        out.update(self.extra)
        return out


@dataclass
class Model(Resource):
    id: str
    name: str
    format: str
    size_bytes: int
    sha256: str
    parameters: int | None
    signature: dict[str, Any]
    trainable: bool
    arch: str | None
    arch_config: dict[str, Any] | None
    created_at: str


@dataclass
class Dataset(Resource):
    id: str
    name: str
    format: str
    n_samples: int
    x_shape: list[int | None]
    x_dtype: str
    has_labels: bool
    n_classes: int | None
    options: dict[str, Any]
    size_bytes: int
    sha256: str
    created_at: str


@dataclass
class Event(Resource):
    seq: int
    at: str
    type: str
    data: dict[str, Any]


@dataclass
class Artifact(Resource):
    id: str
    job_id: str | None
    name: str
    kind: str
    size_bytes: int
    sha256: str
    created_at: str


@dataclass
class Job(Resource):
    id: str
    name: str | None
    status: str
    queue: str
    spec: dict[str, Any]
    progress: dict[str, Any]
    metrics: dict[str, Any]
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    attempt: int
    cancel_requested: bool
    created_at: str
    started_at: str | None
    finished_at: str | None
    client: Client | None = field(default=None, repr=False, compare=False, kw_only=True)

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    def _api(self) -> Client:
        if self.client is None:
            raise RuntimeError("this Job is not bound to a Client; use client.jobs.get(id)")
        return self.client

    def refresh(self) -> Job:
        """The job as it is now (this object is not changed)."""
        return self._api().jobs.get(self.id)

    def cancel(self) -> Job:
        return self._api().jobs.cancel(self.id)

    def events(self, after: int = 0) -> Iterator[Event]:
        return self._api().jobs.iter_events(self.id, after=after)

    def artifacts(self) -> list[Artifact]:
        return self._api().jobs.artifacts(self.id)

    def wait(self, progress: bool = True, timeout: float | None = None, poll: float = 0.5) -> Job:
        """Until the job is terminal (a rich progress bar on stderr when ``progress``)."""
        return self._api().jobs.wait(self.id, progress=progress, timeout=timeout, poll=poll)

    def raise_for_status(self) -> Job:
        """JobFailed (code = the job's error code) unless the job succeeded."""
        if self.status in ("failed", "cancelled"):
            error = self.error or {}
            code = error.get("code") or self.status
            message = error.get("message") or f"job {self.id} was {self.status}"
            raise JobFailed(message, code=code, details=error.get("details") or {}, job=self)
        return self


T = TypeVar("T")


@dataclass
class Page(Generic[T]):
    data: list[T]
    has_more: bool

    def __iter__(self) -> Iterator[T]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)


# --- the client ----------------------------------------------------------------------------


class Client:
    """The distill API. ``url``/``api_key`` default to $DISTILL_URL / $DISTILL_API_KEY."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = (url or os.environ.get("DISTILL_URL") or DEFAULT_URL).rstrip("/")
        api_key = api_key if api_key is not None else os.environ.get("DISTILL_API_KEY")
        headers = {"User-Agent": "distill-sdk/1"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.http = httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout, transport=transport
        )
        self.models = Models(self)
        self.datasets = Datasets(self)
        self.jobs = Jobs(self)
        self.artifacts = Artifacts(self)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def health(self) -> dict[str, Any]:
        """GET /healthz: the API process is up."""
        return self.request("GET", "/healthz").json()

    def ready(self) -> dict[str, Any]:
        """GET /readyz: database, broker and storage reachable (NotReady otherwise)."""
        return self.request("GET", "/readyz").json()

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """One request; the typed error for an error answer."""
        try:
            response = self.http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None
        if response.status_code >= 400:
            raise error_from_response(response)
        return response

    @contextlib.contextmanager
    def stream(self, method: str, path: str, **kw: Any) -> Iterator[httpx.Response]:
        """A streamed request (the body is read by the caller); typed errors as ``request``."""
        try:
            with self.http.stream(method, path, **kw) as response:
                if response.status_code >= 400:
                    response.read()
                    raise error_from_response(response)
                yield response
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None

    def _unreachable(self, exc: httpx.TransportError) -> ServiceUnreachable:
        return ServiceUnreachable(
            f"cannot reach the distill service at {self.url} ({type(exc).__name__}: {exc}); "
            "start it with `distill serve` or set DISTILL_URL / --url"
        )


class _Section:
    def __init__(self, client: Client) -> None:
        self.client = client


def _form(**values: Any) -> dict[str, str]:
    """Form fields without the unset ones; lists and dicts as JSON."""
    out: dict[str, str] = {}
    for key, value in values.items():
        if value is None:
            continue
        out[key] = json.dumps(value) if isinstance(value, list | dict | tuple) else str(value)
    return out


def _upload(client: Client, route: str, path: str | Path, fields: dict[str, str]) -> Any:
    """Multipart POST with the file streamed from disk (httpx reads it in chunks)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    with path.open("rb") as f:
        return client.request("POST", route, files={"file": (path.name, f)}, data=fields).json()


def _zip_folder(folder: Path, target: Path) -> Path:
    """A folder's files in a zip, at its root (the hf upload format)."""
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zf:
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                zf.write(file, file.relative_to(folder).as_posix())
    return target


def _page(cls: type[Resource], body: dict[str, Any], client: Client | None = None) -> Page[Any]:
    items = [cls.from_dict(item) for item in body.get("data", [])]
    if client is not None:
        for item in items:
            item.client = client
    return Page(data=items, has_more=bool(body.get("has_more")))


class Models(_Section):
    """/v1/models: teachers (and trainable students)."""

    def upload(
        self,
        path: str | Path,
        name: str | None = None,
        format: str | None = None,
        arch: str | dict[str, Any] | None = None,
        input_shape: list[int] | tuple[int, ...] | None = None,
    ) -> Model:
        """Upload a model file; the service opens it in a sandbox and records its signature.

        A folder (a Hugging Face ``save_pretrained`` folder) is zipped and uploaded as ``hf``.
        """
        arch_value = json.dumps(arch) if isinstance(arch, dict) else arch
        fields_ = _form(name=name, format=format, arch=arch_value, input_shape=input_shape)
        if Path(path).is_dir():
            with tempfile.TemporaryDirectory() as tmp:
                zipped = _zip_folder(Path(path), Path(tmp) / f"{Path(path).resolve().name}.zip")
                return Model.from_dict(_upload(self.client, "/v1/models", zipped, fields_))
        return Model.from_dict(_upload(self.client, "/v1/models", path, fields_))

    def list(self, limit: int = 20, after: str | None = None) -> Page[Model]:
        params = _form(limit=limit, after=after)
        return _page(Model, self.client.request("GET", "/v1/models", params=params).json())

    def iter(self, page_size: int = 100) -> Iterator[Model]:
        """Every model, newest first, across pages."""
        return _all_pages(lambda after: self.list(limit=page_size, after=after))

    def get(self, model_id: str) -> Model:
        return Model.from_dict(self.client.request("GET", f"/v1/models/{model_id}").json())

    def delete(self, model_id: str) -> dict[str, Any]:
        return self.client.request("DELETE", f"/v1/models/{model_id}").json()


class Datasets(_Section):
    """/v1/datasets: transfer sets."""

    def upload(
        self, path: str | Path, name: str | None = None, label_column: str | None = None
    ) -> Dataset:
        """Upload a transfer set (.npz, .csv, .parquet, .zip of images, .jsonl)."""
        fields_ = _form(name=name, label_column=label_column)
        return Dataset.from_dict(_upload(self.client, "/v1/datasets", path, fields_))

    def list(self, limit: int = 20, after: str | None = None) -> Page[Dataset]:
        params = _form(limit=limit, after=after)
        return _page(Dataset, self.client.request("GET", "/v1/datasets", params=params).json())

    def iter(self, page_size: int = 100) -> Iterator[Dataset]:
        """Every dataset, newest first, across pages."""
        return _all_pages(lambda after: self.list(limit=page_size, after=after))

    def get(self, dataset_id: str) -> Dataset:
        return Dataset.from_dict(self.client.request("GET", f"/v1/datasets/{dataset_id}").json())

    def delete(self, dataset_id: str) -> dict[str, Any]:
        return self.client.request("DELETE", f"/v1/datasets/{dataset_id}").json()


def _all_pages(fetch: Callable[[str | None], Page[Any]]) -> Iterator[Any]:
    after: str | None = None
    while True:
        page = fetch(after)
        yield from page.data
        if not page.has_more or not page.data:
            return
        after = page.data[-1].id


def spec_dict(spec: Any) -> dict[str, Any]:
    """A spec as the JSON body: a dict as is, a pydantic model (JobSpec) as its set fields."""
    if isinstance(spec, dict):
        return spec
    dump = getattr(spec, "model_dump", None)
    if dump is None:
        raise TypeError(f"a job spec is a dict or a JobSpec, not {type(spec).__name__}")
    return dump(mode="json", exclude_unset=True)


class Jobs(_Section):
    """/v1/jobs: distillation jobs, their events and artifacts."""

    def _job(self, body: dict[str, Any]) -> Job:
        job = Job.from_dict(body)
        job.client = self.client
        return job

    def create(self, spec: Any, idempotency_key: str | None = None) -> Job:
        """Submit a spec (dict or JobSpec); the same ``idempotency_key`` returns the first job."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        response = self.client.request("POST", "/v1/jobs", json=spec_dict(spec), headers=headers)
        return self._job(response.json())

    def list(
        self, status: str | None = None, limit: int = 20, after: str | None = None
    ) -> Page[Job]:
        params = _form(status=status, limit=limit, after=after)
        body = self.client.request("GET", "/v1/jobs", params=params).json()
        return _page(Job, body, self.client)

    def iter(self, status: str | None = None, page_size: int = 100) -> Iterator[Job]:
        """Every job (optionally with one status), newest first, across pages."""
        return _all_pages(lambda after: self.list(status=status, limit=page_size, after=after))

    def get(self, job_id: str) -> Job:
        return self._job(self.client.request("GET", f"/v1/jobs/{job_id}").json())

    def cancel(self, job_id: str) -> Job:
        """Cancel (idempotent): a queued job stops at once, a running one within seconds."""
        return self._job(self.client.request("POST", f"/v1/jobs/{job_id}/cancel").json())

    def events(self, job_id: str, after: int = 0, limit: int = 100) -> Page[Event]:
        """One page of events with ``seq > after``, oldest first."""
        params = {"after": after, "limit": limit}
        body = self.client.request("GET", f"/v1/jobs/{job_id}/events", params=params).json()
        return _page(Event, body)

    def iter_events(self, job_id: str, after: int = 0) -> Iterator[Event]:
        """Every event recorded so far after ``after``, across pages."""
        while True:
            page = self.events(job_id, after=after, limit=1000)
            yield from page.data
            if not page.has_more or not page.data:
                return
            after = page.data[-1].seq

    def stream_events(self, job_id: str, after: int = 0, reconnects: int = 5) -> Iterator[Event]:
        """Live events (SSE) until the job's final status event; reconnects where it left off."""
        last, failures = after, 0
        while True:
            headers = {"Accept": "text/event-stream", "Last-Event-ID": str(last)}
            try:
                with self.client.stream(
                    "GET",
                    f"/v1/jobs/{job_id}/events",
                    headers=headers,
                    timeout=httpx.Timeout(30.0, read=None),
                ) as response:
                    for event in _parse_sse(response.iter_lines()):
                        last, failures = event.seq, 0
                        yield event
                return  # the server ends the stream after the final status
            except (ServiceUnreachable, httpx.TransportError):
                failures += 1
                if failures > reconnects:
                    raise
                time.sleep(min(2.0, 0.2 * 2**failures))

    def artifacts(self, job_id: str) -> list[Artifact]:
        body = self.client.request("GET", f"/v1/jobs/{job_id}/artifacts").json()
        return list(_page(Artifact, body).data)

    def wait(
        self,
        job_id: str,
        progress: bool = True,
        timeout: float | None = None,
        poll: float = 0.5,
        on_event: Callable[[Event], None] | None = None,
    ) -> Job:
        """Poll until the job is terminal; the final Job (check ``raise_for_status()``).

        With ``progress`` a rich bar on stderr shows stage, epoch, loss, val metric and ETA.
        ``on_event`` receives every event, in order. TimeoutError after ``timeout`` seconds.
        """
        from client.progress import ProgressFeed

        deadline = None if timeout is None else time.monotonic() + timeout
        feed = ProgressFeed(enabled=progress)
        seq = 0
        with feed:
            while True:
                job = self.get(job_id)
                for event in self.iter_events(job_id, after=seq):
                    seq = event.seq
                    feed.event(event)
                    if on_event is not None:
                        on_event(event)
                feed.job(job)
                if job.done:
                    return job
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"job {job_id} is still {job.status} after {timeout:g} s; "
                        "wait longer or cancel it"
                    )
                time.sleep(poll)


def _parse_sse(lines: Iterator[str]) -> Iterator[Event]:
    """Server-sent events → Events (comments and ``retry:`` lines skipped)."""
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                yield Event.from_dict(json.loads("\n".join(data)))
                data = []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if name == "data":
            data.append(value.removeprefix(" "))
    if data:
        yield Event.from_dict(json.loads("\n".join(data)))


class Artifacts(_Section):
    """/v1/artifacts: metadata and downloads."""

    def get(self, artifact_id: str) -> Artifact:
        return Artifact.from_dict(self.client.request("GET", f"/v1/artifacts/{artifact_id}").json())

    def download(self, artifact_id: str, path: str | Path, *, resume: bool = True) -> Path:
        """Stream an artifact to ``path`` (a folder: under the artifact's name); its path.

        Bytes go to ``<path>.part`` first; an existing ``.part`` is continued with a Range
        request (when ``resume``). The sha256 is checked against the ETag before the file takes
        its name: ChecksumMismatch otherwise (the partial file is removed).
        """
        meta = self.get(artifact_id)
        target = Path(path)
        if target.is_dir() or str(path).endswith(("/", os.sep)):
            target = target / meta.name
        target.parent.mkdir(parents=True, exist_ok=True)
        same_size = target.is_file() and target.stat().st_size == meta.size_bytes
        if same_size and _sha256_file(target) == meta.sha256:
            return target  # already here
        part = target.with_name(target.name + ".part")
        digest = hashlib.sha256()
        offset = part.stat().st_size if resume and part.is_file() else 0
        if offset >= meta.size_bytes:
            offset = 0  # longer than the file: not a prefix of it
        headers = {}
        if offset:
            headers = {"Range": f"bytes={offset}-", "If-Range": f'"{meta.sha256}"'}
        url = f"/v1/artifacts/{artifact_id}/content"
        with self.client.stream("GET", url, headers=headers) as response:
            etag = response.headers.get("ETag", "").strip('"') or meta.sha256
            if response.status_code == 206:
                with part.open("rb") as existing:
                    _hash_into(digest, existing)
                mode = "ab"
            else:
                mode = "wb"
            with part.open(mode) as out:
                for chunk in response.iter_bytes(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
        actual = digest.hexdigest()
        if actual != etag:
            part.unlink(missing_ok=True)
            raise ChecksumMismatch(
                f"{meta.name}: downloaded bytes have sha256 {actual[:12]}…, the service says "
                f"{etag[:12]}…; the partial file was removed, download again",
                details={"expected": etag, "actual": actual, "artifact_id": artifact_id},
            )
        part.replace(target)
        return target


def _hash_into(digest: Any, f: IO[bytes]) -> None:
    while chunk := f.read(CHUNK):
        digest.update(chunk)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        _hash_into(digest, f)
    return digest.hexdigest()


__all__ = [
    "Artifact",
    "Client",
    "Dataset",
    "DistillAPIError",
    "Event",
    "Job",
    "Model",
    "Page",
]
