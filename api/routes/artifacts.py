"""Artifacts: a job's files (students, report), their metadata, and their bytes (Range, ETag)."""

from __future__ import annotations

import mimetypes
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Header, Response
from fastapi.responses import StreamingResponse
from sqlalchemy import select

from api.deps import OwnedArtifactDep, OwnedJobDep, SessionDep, StorageDep
from api.schemas import ArtifactList, ArtifactPublic, error_responses
from core.errors import DistillError, RangeNotSatisfiable
from core.models import Artifact

router = APIRouter(tags=["artifacts"], responses=error_responses(401, 404))


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """One ``bytes=`` range as ``(start, end)`` with ``end`` exclusive; None: send everything.

    Malformed and multi-range headers are ignored (RFC 9110 allows it); a range that starts past
    the end raises RangeNotSatisfiable.
    """
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = (p.strip() for p in spec.partition("-"))
    if not dash or not (first.isdigit() or first == "") or not (last.isdigit() or last == ""):
        return None
    if first == "":
        if last == "":
            return None
        length = int(last)
        if length == 0 or size == 0:
            raise _unsatisfiable(size)
        return max(size - length, 0), size
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        raise _unsatisfiable(size)
    end = min(int(last) + 1, size) if last else size
    return start, end


def _unsatisfiable(size: int) -> RangeNotSatisfiable:
    exc = RangeNotSatisfiable(
        f"the requested range is outside the file's {size} bytes",
        details={"size_bytes": size},
    )
    exc.headers = {"Content-Range": f"bytes */{size}"}  # type: ignore[attr-defined]
    return exc


def etag_matches(header: str, etag: str) -> bool:
    """Whether an If-None-Match header names this ETag (weak comparison, ``*`` matches)."""
    for tag in header.split(","):
        tag = tag.strip()
        if tag == "*" or tag.removeprefix("W/") == etag:
            return True
    return False


def content_disposition(filename: str) -> str:
    ascii_name = filename.encode("ascii", "ignore").decode().replace('"', "").replace("\\", "")
    value = f'attachment; filename="{ascii_name or "download"}"'
    if ascii_name != filename:
        value += f"; filename*=UTF-8''{quote(filename, safe='')}"
    return value


@router.get(
    "/v1/jobs/{job_id}/artifacts", response_model=ArtifactList, responses=error_responses(404)
)
def list_job_artifacts(job: OwnedJobDep, session: SessionDep) -> dict[str, Any]:
    """List a job's artifacts (the students in each export format and the report)."""
    rows = session.scalars(
        select(Artifact).where(Artifact.job_id == job.id).order_by(Artifact.name)
    ).all()
    return {"data": list(rows), "has_more": False}


@router.get("/v1/artifacts/{artifact_id}", response_model=ArtifactPublic)
async def get_artifact(artifact: OwnedArtifactDep) -> Artifact:
    """Get an artifact's metadata."""
    return artifact


@router.get(
    "/v1/artifacts/{artifact_id}/content",
    response_model=None,
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "The file"},
        206: {"content": {"application/octet-stream": {}}, "description": "One byte range"},
        304: {"description": "Not modified (If-None-Match)"},
    }
    | error_responses(416),
)
def download_artifact(
    artifact: OwnedArtifactDep,
    storage: StorageDep,
    range_: Annotated[str | None, Header(alias="Range")] = None,
    if_none_match: Annotated[str | None, Header(alias="If-None-Match")] = None,
    if_range: Annotated[str | None, Header(alias="If-Range")] = None,
) -> Response:
    """Download an artifact's bytes; supports one `Range`, `If-None-Match` and `If-Range`."""
    etag = f'"{artifact.sha256}"'
    headers = {
        "ETag": etag,
        "Accept-Ranges": "bytes",
        "Content-Disposition": content_disposition(artifact.name),
        "Cache-Control": "private, max-age=0, must-revalidate",
    }
    if if_none_match and etag_matches(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    try:
        size = storage.size(artifact.storage_key)
    except FileNotFoundError:
        raise DistillError(
            f"the file of artifact '{artifact.id}' is missing from storage; the job's outputs "
            "were lost, run the job again"
        ) from None
    span = None
    if range_ and (if_range is None or if_range.strip() == etag):
        span = parse_range(range_, size)
    start, end = span or (0, size)
    headers["Content-Length"] = str(end - start)
    status = 200
    if span is not None:
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    media_type = mimetypes.guess_type(artifact.name)[0] or "application/octet-stream"
    return StreamingResponse(
        storage.open_range(artifact.storage_key, start, end),
        status_code=status,
        headers=headers,
        media_type=media_type,
    )
