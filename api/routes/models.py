"""Models: upload (streamed, then inspected in a sandbox), list, get, delete."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from api.deps import (
    OwnedModelDep,
    SessionDep,
    SettingsDep,
    StorageDep,
    TenantDep,
    page,
)
from api.errors import InvalidRequest
from api.schemas import Deleted, ModelList, ModelPublic, error_responses
from api.upload_store import save_row, stored_upload, upload_name
from api.uploads import Upload
from core.config import Settings
from core.errors import InvalidSpec
from core.jobs import delete_upload
from core.models import Model, new_id
from core.spec import check_values
from core.storage import Storage

router = APIRouter(prefix="/v1/models", tags=["models"], responses=error_responses(401))

FORMATS = ("exported_program", "hf", "onnx", "safetensors", "torchscript")
FIELDS = ("name", "format", "arch", "input_shape")

UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "name": {"type": "string", "maxLength": 200},
                        "format": {"type": "string", "enum": list(FORMATS)},
                        "arch": {
                            "type": "string",
                            "description": "safetensors: a built-in architecture name, or JSON "
                            '{"name": …, "config": {…}}',
                        },
                        "input_shape": {
                            "type": "string",
                            "description": "TorchScript: one sample's input shape as a JSON list, "
                            "e.g. [3, 32, 32]",
                        },
                    },
                }
            }
        },
    }
}


def parse_model_fields(fields: dict[str, str], filename: str) -> dict[str, Any]:
    """The upload's form fields as inspection options; InvalidRequest naming a bad field."""
    name = upload_name(fields, filename, FIELDS)
    fmt = fields.get("format", "").strip() or None
    if fmt is not None and fmt not in FORMATS:
        raise InvalidRequest(
            f"format '{fmt}' is not one of {', '.join(FORMATS)} (leave it out to detect it)",
            field="format",
        )
    arch, arch_config = _parse_arch(fields.get("arch", "").strip())
    return {
        "name": name,
        "format": fmt,
        "arch": arch,
        "arch_config": arch_config,
        "input_shape": _parse_input_shape(fields.get("input_shape", "").strip()),
    }


def _parse_arch(text: str) -> tuple[str | None, dict[str, Any] | None]:
    if not text:
        return None, None
    if not text.startswith("{"):
        return text, None
    try:
        value = json.loads(text)
        check_values(value)  # NaN or Infinity in a config: nothing to build, nothing to store
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"arch is not valid JSON ({exc.msg})", field="arch") from None
    except RecursionError:
        raise InvalidRequest("arch is nested too deeply to be a config", field="arch") from None
    except InvalidSpec as exc:
        raise InvalidRequest(f"arch: {exc.message}", field="arch") from None
    if (
        not isinstance(value, dict)
        or not isinstance(value.get("name"), str)
        or not isinstance(value.get("config", {}), dict)
        or set(value) - {"name", "config"}
    ):
        raise InvalidRequest(
            'arch must be a name or JSON {"name": "...", "config": {...}}', field="arch"
        )
    return value["name"], value.get("config") or {}


def _parse_input_shape(text: str) -> list[int | None] | None:
    """One sample's shape, e.g. ``[3, 32, 32]`` (a leading ``null`` batch dimension is allowed)."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        value = None
    dims = value[1:] if isinstance(value, list) and value and value[0] is None else value
    if (
        not isinstance(dims, list)
        or not dims
        or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims)
    ):
        raise InvalidRequest(
            "input_shape must be one sample's shape as a JSON list of positive integers, "
            "e.g. [3, 32, 32]",
            field="input_shape",
        )
    return value


def _inspect(storage: Storage, upload: Upload, options: dict[str, Any], settings: Settings) -> Any:
    from core.distill.inspect import inspect_model_file  # runs the file in a child process

    with storage.local_copy(upload.blob.key) as path:
        return inspect_model_file(
            path,
            options["format"],
            options["arch"],
            options["arch_config"],
            options["input_shape"],
            timeout_s=settings.inspect_timeout_seconds,
            memory_mb=settings.inspect_memory_mb,
            isolation=settings.isolation,
        )


@router.post(
    "",
    status_code=201,
    response_model=ModelPublic,
    responses=error_responses(413, 422),
    openapi_extra=UPLOAD_BODY,
)
async def upload_model(
    request: Request,
    session: SessionDep,
    tenant: TenantDep,
    storage: StorageDep,
    settings: SettingsDep,
) -> Model:
    """Upload a model file (multipart field `file`); it is opened in a sandbox and described."""
    model_id = new_id("mdl")
    key_stem = f"models/{tenant.id}/{model_id}"
    async with stored_upload(request, session, tenant.id, storage, settings, key_stem) as upload:
        options = parse_model_fields(upload.fields, upload.filename)
        inspection = await run_in_threadpool(_inspect, storage, upload, options, settings)
        info = inspection.info
        row = Model(
            id=model_id,
            tenant_id=tenant.id,
            name=options["name"],
            format=inspection.format,
            arch=inspection.arch,
            arch_config=inspection.arch_config,
            size_bytes=upload.blob.size,
            sha256=upload.blob.sha256,
            parameters=inspection.parameters,
            signature={
                "inputs": [t.model_dump() for t in info.inputs],
                "outputs": [t.model_dump() for t in info.outputs],
                **({"hf": inspection.hf} if inspection.hf else {}),
                "has_default_features": info.has_default_features,
            },
            trainable=inspection.trainable,
            storage_key=upload.blob.key,
        )
        await save_row(session, row)
    return row


@router.get("", response_model=ModelList, responses=error_responses(422))
def list_models(
    session: SessionDep,
    tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(description="the last id of the previous page")] = None,
    sha256: Annotated[
        str | None, Query(description="only uploads of the file with this sha256 (hex)")
    ] = None,
) -> dict[str, Any]:
    """List the tenant's models, newest first."""
    query = select(Model).where(Model.tenant_id == tenant.id)
    if sha256:
        query = query.where(Model.sha256 == sha256.lower())
    if after:
        query = query.where(Model.id < after)
    rows, has_more = page(
        list(session.scalars(query.order_by(Model.id.desc()).limit(limit + 1))), limit
    )
    return {"data": rows, "has_more": has_more}


@router.get("/{model_id}", response_model=ModelPublic, responses=error_responses(404))
async def get_model(model: OwnedModelDep) -> Model:
    """Get one model."""
    return model


@router.delete("/{model_id}", response_model=Deleted, responses=error_responses(404, 409))
def delete_model(model: OwnedModelDep, session: SessionDep, storage: StorageDep) -> Deleted:
    """Delete a model and its file; refused while a queued or running job uses it."""
    key, model_id = model.storage_key, model.id
    delete_upload(session, model)
    storage.delete(key)
    return Deleted(id=model_id)
