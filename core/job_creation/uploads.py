"""A job's spec checked against what its tenant has uploaded, then completed from it."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Row

from core.budget import check_budget
from core.config import Settings
from core.errors import InvalidSpec
from core.job_creation.statements import JobStatements
from core.models import Model, Tenant
from core.spec import DatasetInfo, JobSpec, ModelInfo, ModelRef, complete_spec


class Uploads:
    """The models and datasets that some specs name: one round trip on PostgreSQL, two queries
    elsewhere."""

    def __init__(self, conn: Connection, statements: JobStatements, specs: list[JobSpec]) -> None:
        model_ids = {r.ref.model_id for spec in specs for r in spec.model_refs() if r.ref.model_id}
        dataset_ids = {spec.dataset_id for spec in specs if spec.dataset_id}
        self._models: dict[str, Any] = {}
        self._datasets: dict[str, Any] = {}
        if model_ids or dataset_ids:
            self._models, self._datasets = statements.read_uploads(conn, model_ids, dataset_ids)

    def model(self, tenant: Tenant, model_id: str) -> Any:
        row = self._models.get(model_id)
        return row if row is not None and row.tenant_id == tenant.id else None

    def dataset_info(self, tenant: Tenant, dataset_id: str) -> dict[str, Any] | None:
        row = self._datasets.get(dataset_id)
        return row.info if row is not None and row.tenant_id == tenant.id else None


def resolve_spec(
    uploads: Uploads, tenant: Tenant, spec: JobSpec, settings: Settings
) -> tuple[JobSpec, list[str]]:
    """Check every id against the tenant's uploads, complete the spec and check its budget.

    Returns the completed spec and the ids of the models the job uses.
    """
    teachers = [_model_for(uploads, tenant, ref, name) for name, ref in spec.teacher_fields()]
    used = [m.id for m in teachers]
    for field_name, student in spec.student_fields():
        if student.path is not None:
            raise InvalidSpec(
                f"'{field_name}.path' is for `distill run`; upload the student with POST "
                "/v1/models and give its model_id",
                field=f"{field_name}.path",
            )
        if student.model_id is None:
            continue
        model = _model_for(uploads, tenant, ModelRef(model_id=student.model_id), field_name)
        _check_hf_student(teachers, model, field_name)
        if not model.trainable:
            raise InvalidSpec(
                f"model '{model.id}' ({model.format}) cannot be trained; a student must be an "
                "exported_program, torchscript or safetensors upload, or a preset",
                field=f"{field_name}.model_id",
            )
        used.append(model.id)

    if spec.dataset_path is not None:
        raise InvalidSpec(
            "'dataset_path' is for `distill run`; upload the dataset with POST /v1/datasets and "
            "give its dataset_id",
            field="dataset_path",
        )
    info = uploads.dataset_info(tenant, spec.dataset_id) if spec.dataset_id else None
    if info is None:
        raise InvalidSpec(
            f"no dataset '{spec.dataset_id}'; upload it with POST /v1/datasets (GET "
            "/v1/datasets lists yours)",
            field="dataset_id",
        )
    dataset = DatasetInfo.model_validate(info)
    infos = [model_info(m) for m in teachers]
    completed = complete_spec(spec, infos, dataset)
    check_budget(completed, infos, dataset, settings)
    return completed, list(dict.fromkeys(used))


def _check_hf_student(teachers: list[Row[Any]], student: Row[Any], field_name: str) -> None:
    """An hf teacher's uploaded student is an hf model with the teacher's vocabulary."""
    teacher_hf = teachers[0].signature.get("hf") if teachers else None
    if teacher_hf is None:
        return
    student_hf = student.signature.get("hf")
    if student_hf is None:
        raise InvalidSpec(
            f"model '{student.id}' is a {student.format} file; a Hugging Face teacher's "
            "student is an hf upload (a save_pretrained zip) with the teacher's tokenizer",
            field=f"{field_name}.model_id",
        )
    if student_hf.get("vocab_sha256") != teacher_hf.get("vocab_sha256"):
        raise InvalidSpec(
            f"model '{student.id}' has another vocabulary than the teacher (vocab_size "
            f"{student_hf.get('vocab_size')} vs {teacher_hf.get('vocab_size')}), so their token "
            "ids do not match; save the student with the teacher's tokenizer",
            field=field_name,
        )


def _model_for(uploads: Uploads, tenant: Tenant, ref: ModelRef, field_name: str) -> Row[Any]:
    if ref.path is not None:
        raise InvalidSpec(
            f"'{field_name}.path' is for `distill run` on local files; upload the model with "
            "POST /v1/models and give its model_id",
            field=f"{field_name}.path",
        )
    if ref.format is not None or ref.arch is not None:
        which = "format" if ref.format is not None else "arch"
        raise InvalidSpec(
            f"'{field_name}.{which}' is for local files; the service uses what it recorded when "
            "the model was uploaded, so remove it",
            field=f"{field_name}.{which}",
        )
    model = uploads.model(tenant, ref.model_id) if ref.model_id else None
    if model is None:
        raise InvalidSpec(
            f"no model '{ref.model_id}'; upload it with POST /v1/models (GET /v1/models lists "
            "yours)",
            field=f"{field_name}.model_id",
        )
    return model


def model_info(model: Model | Row[Any]) -> ModelInfo:
    """The ModelInfo recorded for an uploaded model."""
    return ModelInfo(
        format=model.format,
        inputs=model.signature["inputs"],
        outputs=model.signature["outputs"],
        has_default_features=model.signature.get("has_default_features"),
        trainable=model.trainable,
        arch=model.arch,
        parameters=model.parameters,
        hf=model.signature.get("hf"),
    )
