"""What every upload route does around its own inspection: the file received within the
tenant's quota, the form's common fields checked, the row saved, and the file deleted again
when anything after its receipt fails."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import PurePosixPath
from typing import Any

from fastapi import Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.errors import InvalidRequest
from api.quotas import upload_limit
from api.uploads import Upload, receive_upload
from core.config import Settings
from core.errors import PayloadTooLarge
from core.storage import Storage

MAX_NAME_LENGTH = 200


@asynccontextmanager
async def stored_upload(
    request: Request,
    session: Session,
    tenant_id: str,
    storage: Storage,
    settings: Settings,
    key_stem: str,
) -> AsyncIterator[Upload]:
    """The request's file, stored under ``key_stem`` within the tenant's quota; a refused or
    failed upload (an error inside the ``with``) keeps nothing."""
    limit = await run_in_threadpool(upload_limit, session, tenant_id, settings)
    try:
        upload = await receive_upload(request, storage, key_stem, max_bytes=limit.max_bytes)
    except PayloadTooLarge as exc:
        raise limit.refusal(exc) from None
    try:
        yield upload
    except BaseException:
        await run_in_threadpool(storage.delete, upload.blob.key)
        raise


async def save_row(session: Session, row: Any) -> None:
    """Add the upload's row and commit."""

    def save() -> None:
        session.add(row)
        session.commit()

    await run_in_threadpool(save)


def default_name(filename: str) -> str:
    stem = PurePosixPath(filename.replace("\\", "/")).stem
    return (stem or "model")[:MAX_NAME_LENGTH]


def upload_name(fields: dict[str, str], filename: str, allowed: tuple[str, ...]) -> str:
    """The upload's name (its file's stem when none is given); InvalidRequest for a form field
    not in ``allowed`` or a name too long."""
    unknown = sorted(set(fields) - set(allowed))
    if unknown:
        raise InvalidRequest(
            f"unknown form field '{unknown[0]}'; the fields are file, {', '.join(allowed)}",
            field=unknown[0],
        )
    name = fields.get("name", "").strip() or default_name(filename)
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidRequest(f"name is longer than {MAX_NAME_LENGTH} characters", field="name")
    return name
