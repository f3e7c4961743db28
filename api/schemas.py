"""Request and response models (…Public for one resource, …List for a page of them)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from fastapi import Response
from pydantic import BaseModel, ConfigDict, Field, PlainSerializer

from core.models import as_utc
from core.spec import TensorInfo


def rfc3339(value: datetime) -> str:
    """UTC with a ``Z``."""
    return as_utc(value).astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


Timestamp = Annotated[
    datetime, PlainSerializer(rfc3339, return_type=str, when_used="json-unless-none")
]

T = TypeVar("T")


class Public(BaseModel):
    model_config = ConfigDict(from_attributes=True)


def json_response(
    body: BaseModel, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """``body`` as the JSON response, serialized once.

    A handler that returns a model instead has it validated again against its
    ``response_model`` before serialization; the busiest routes skip that.
    """
    return Response(
        body.model_dump_json(), status_code, headers=headers, media_type="application/json"
    )


class Page(BaseModel, Generic[T]):
    data: list[T]
    has_more: bool = False


class ErrorBody(BaseModel):
    code: str = Field(examples=["invalid_spec"])
    message: str = Field(examples=["'training.epochs': Input should be greater than or equal to 1"])
    details: dict[str, Any] = Field(default_factory=dict)


class ErrorResponse(BaseModel):
    error: ErrorBody


class Signature(BaseModel):
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    # hf uploads: architecture, model_type, task, num_labels, id2label, vocab_size, sizes
    hf: dict[str, Any] | None = None


class ModelPublic(Public):
    id: str
    name: str
    format: str
    size_bytes: int
    sha256: str
    parameters: int | None
    signature: Signature
    trainable: bool
    arch: str | None
    arch_config: dict[str, Any] | None
    created_at: Timestamp


class DatasetPublic(Public):
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
    created_at: Timestamp


JobStatus = Literal["queued", "running", "cancelling", "succeeded", "failed", "cancelled"]


class Progress(BaseModel):
    stage: int | None = None
    stages: int | None = None
    epoch: int | None = None
    epochs: int | None = None
    step: int | None = None
    steps: int | None = None
    fraction: float = 0.0
    eta_seconds: float | None = None

    model_config = ConfigDict(extra="allow")


class JobErrorBody(BaseModel):
    code: str
    message: str
    details: dict[str, Any] | None = None


class JobPublic(Public):
    id: str
    name: str | None
    status: JobStatus
    queue: str
    spec: dict[str, Any]
    progress: Progress
    metrics: dict[str, Any]
    result: dict[str, Any] | None
    error: JobErrorBody | None
    attempt: int
    cancel_requested: bool
    created_at: Timestamp
    started_at: Timestamp | None
    finished_at: Timestamp | None


SearchStatus = Literal["running", "cancelling", "succeeded", "failed", "cancelled"]


class SearchTrialJob(BaseModel):
    """A child job of a search, as the search lists it while it runs."""

    id: str
    status: JobStatus
    student: dict[str, Any]
    method: str | None


class SearchPublic(BaseModel):
    id: str
    name: str | None
    status: SearchStatus
    request: dict[str, Any]
    jobs: list[SearchTrialJob]
    skipped: list[dict[str, Any]]
    result: dict[str, Any] | None
    error: JobErrorBody | None
    cancel_requested: bool
    created_at: Timestamp
    finished_at: Timestamp | None


class EventPublic(Public):
    seq: int
    at: Timestamp
    type: str
    data: dict[str, Any]


class ArtifactPublic(Public):
    id: str
    job_id: str
    name: str
    kind: str
    size_bytes: int
    sha256: str
    created_at: Timestamp


class Deleted(BaseModel):
    id: str
    deleted: Literal[True] = True


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready"] = "ready"
    # Each dependency's state: shown to the operator (DISTILL_OPERATOR_TOKEN) only.
    checks: dict[str, str] | None = None


ModelList = Page[ModelPublic]
DatasetList = Page[DatasetPublic]
JobList = Page[JobPublic]
EventList = Page[EventPublic]
ArtifactList = Page[ArtifactPublic]
SearchList = Page[SearchPublic]


_ERROR_TEXT = {
    401: "Missing, invalid or revoked API key",
    404: "No such resource for this tenant",
    409: "Conflicts with the resource's state",
    413: "Upload larger than the limit",
    416: "Range not satisfiable",
    422: "Invalid request, spec or file; `details.field` names what is wrong",
    503: "A dependency is unreachable",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` documenting the error envelope for these status codes."""
    return {
        code: {"model": ErrorResponse, "description": _ERROR_TEXT.get(code, "Error")}
        for code in codes
    }
