"""Datasets (transfer sets): upload (streamed, then inspected in a sandbox), list, get, delete."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from api.deps import OwnedDatasetDep, SessionDep, SettingsDep, StorageDep, TenantDep, page
from api.schemas import DatasetList, DatasetPublic, Deleted, error_responses
from api.upload_store import save_row, stored_upload, upload_name
from api.uploads import Upload
from core.config import Settings
from core.jobs import delete_upload
from core.models import Dataset, new_id
from core.storage import Storage

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], responses=error_responses(401))

FIELDS = ("name", "label_column")

UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": ".npz, .csv, .parquet, .zip (image folders), .jsonl",
                        },
                        "name": {"type": "string", "maxLength": 200},
                        "label_column": {
                            "type": "string",
                            "description": "csv/parquet: the column holding the labels",
                        },
                    },
                }
            }
        },
    }
}


def parse_dataset_fields(fields: dict[str, str], filename: str) -> tuple[str, dict[str, Any]]:
    """The dataset's name and inspection options; InvalidRequest naming a bad field."""
    name = upload_name(fields, filename, FIELDS)
    options: dict[str, Any] = {}
    if fields.get("label_column", "").strip():
        options["label_column"] = fields["label_column"].strip()
    return name, options


def _inspect(storage: Storage, upload: Upload, options: dict[str, Any], settings: Settings) -> Any:
    from core.distill.inspect import inspect_dataset_file  # reads the file in a child process

    with storage.local_copy(upload.blob.key) as path:
        return inspect_dataset_file(
            path,
            upload.filename,
            options,
            timeout_s=settings.inspect_timeout_seconds,
            memory_mb=settings.inspect_memory_mb,
            isolation=settings.isolation,
        )


@router.post(
    "",
    status_code=201,
    response_model=DatasetPublic,
    responses=error_responses(413, 422),
    openapi_extra=UPLOAD_BODY,
)
async def upload_dataset(
    request: Request,
    session: SessionDep,
    tenant: TenantDep,
    storage: StorageDep,
    settings: SettingsDep,
) -> Dataset:
    """Upload a transfer set (multipart field `file`); it is read in a sandbox and described."""
    dataset_id = new_id("ds")
    key_stem = f"datasets/{tenant.id}/{dataset_id}"
    async with stored_upload(request, session, tenant.id, storage, settings, key_stem) as upload:
        name, options = parse_dataset_fields(upload.fields, upload.filename)
        inspection = await run_in_threadpool(_inspect, storage, upload, options, settings)
        info = inspection.info
        row = Dataset(
            id=dataset_id,
            tenant_id=tenant.id,
            name=name,
            format=inspection.format,
            options=options,
            n_samples=info.n_samples,
            x_shape=list(info.x_shape),
            x_dtype=info.x_dtype,
            has_labels=info.has_labels,
            n_classes=info.n_classes,
            info=info.model_dump(mode="json"),
            size_bytes=upload.blob.size,
            sha256=upload.blob.sha256,
            storage_key=upload.blob.key,
        )
        await save_row(session, row)
    return row


@router.get("", response_model=DatasetList, responses=error_responses(422))
def list_datasets(
    session: SessionDep,
    tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(description="the last id of the previous page")] = None,
    sha256: Annotated[
        str | None, Query(description="only uploads of the file with this sha256 (hex)")
    ] = None,
) -> dict[str, Any]:
    """List the tenant's datasets, newest first."""
    query = select(Dataset).where(Dataset.tenant_id == tenant.id)
    if sha256:
        query = query.where(Dataset.sha256 == sha256.lower())
    if after:
        query = query.where(Dataset.id < after)
    rows = list(session.scalars(query.order_by(Dataset.id.desc()).limit(limit + 1)))
    data, has_more = page(rows, limit)
    return {"data": data, "has_more": has_more}


@router.get("/{dataset_id}", response_model=DatasetPublic, responses=error_responses(404))
async def get_dataset(dataset: OwnedDatasetDep) -> Dataset:
    """Get one dataset."""
    return dataset


@router.delete("/{dataset_id}", response_model=Deleted, responses=error_responses(404, 409))
def delete_dataset(dataset: OwnedDatasetDep, session: SessionDep, storage: StorageDep) -> Deleted:
    """Delete a dataset and its file; refused while a queued or running job uses it."""
    key, dataset_id = dataset.storage_key, dataset.id
    delete_upload(session, dataset)
    storage.delete(key)
    return Deleted(id=dataset_id)
