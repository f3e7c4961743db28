"""Open an uploaded model or dataset in the sandbox and describe it.

:func:`inspect_model_file` and :func:`inspect_dataset_file` are what the API calls at upload and
the CLI calls for local runs. The file is opened only in a child process with time and memory
limits (:mod:`core.distill.sandbox`); what comes back is plain JSON.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel

from core.distill.cage import Isolation, isolation
from core.distill.sandbox import keep_warm, run_sandboxed
from core.errors import DatasetInvalid, DistillError, ModelInvalid, UnsafeModelFile
from core.spec import DatasetInfo, ModelInfo

# What opening a model or a dataset imports: a spare sandbox child imports them ahead of need.
INSPECTION_MODULES = ("torch", "core.distill.teachers", "core.distill.data", "transformers")


class ModelInspection(BaseModel):
    """A model file's format and signature (``info``), as found by opening it."""

    format: str
    info: ModelInfo
    parameters: int | None = None
    arch: str | None = None
    arch_config: dict[str, Any] | None = None
    trainable: bool
    hf: dict[str, Any] | None = None  # the signature's hf block


class DatasetInspection(BaseModel):
    format: str
    info: DatasetInfo


def keep_inspection_warm(isolation: Isolation | None = None) -> None:
    """Keep a sandbox child ready with torch imported, so an upload pays only for its own file."""
    keep_warm(INSPECTION_MODULES, isolation)


def inspect_model_file(
    path: Path,
    format: str | None = None,
    arch: str | None = None,
    arch_config: dict[str, Any] | None = None,
    input_shape: list[int | None] | None = None,
    *,
    timeout_s: float = 60,
    memory_mb: int = 4096,
    isolation: Isolation | None = None,
) -> ModelInspection:
    """Detect, open and dry-run a model file in the sandbox.

    ``input_shape`` is one sample's shape (no batch dimension; a leading ``None`` is dropped);
    it lets a TorchScript file, which does not declare its input, be probed. Formats that are
    programs are refused when ``isolation`` has no cage for them.
    """
    isolation = isolation or _default_isolation()
    result = run_sandboxed(
        "core.distill.inspect:model_in_child",
        {
            "format": format,
            "arch": arch,
            "arch_config": arch_config,
            "input_shape": input_shape,
            "refusal": None if isolation.programs_allowed else isolation.reason,
        },
        files={"path": Path(path)},
        timeout_s=timeout_s,
        memory_mb=memory_mb,
        error_class=ModelInvalid,
        isolation=isolation,
    )
    return ModelInspection.model_validate(result)


def inspect_dataset_file(
    path: Path,
    filename: str,
    options: dict[str, Any] | None = None,
    *,
    timeout_s: float = 120,
    memory_mb: int = 4096,
    isolation: Isolation | None = None,
) -> DatasetInspection:
    """Read a dataset file in the sandbox; ``filename`` (the upload's name) gives the format."""
    result = run_sandboxed(
        "core.distill.inspect:dataset_in_child",
        {"filename": filename, "options": options or {}},
        files={"path": Path(path)},
        timeout_s=timeout_s,
        memory_mb=memory_mb,
        error_class=DatasetInvalid,
        isolation=isolation or _default_isolation(),
    )
    return DatasetInspection.model_validate(result)


def _default_isolation() -> Isolation:
    return isolation()


# --- run inside the sandbox --------------------------------------------------------------------


def _passthrough(exc: BaseException) -> bool:
    """Errors the sandbox reports itself: ours, and running out of memory."""
    text = str(exc).lower()
    return isinstance(exc, (DistillError, MemoryError)) or "allocate memory" in text


def model_in_child(
    path: str,
    format: str | None,
    arch: str | None,
    arch_config: dict[str, Any] | None,
    input_shape: list[int | None] | None,
    refusal: str | None = None,
) -> dict[str, Any]:
    """Sandbox side of :func:`inspect_model_file`; ``refusal`` set: no cage for programs."""
    import torch

    from core.distill.formats import detect_format
    from core.distill.teachers import load_teacher
    from core.distill.types import ModelFile

    torch.set_num_threads(1)
    try:
        fmt = detect_format(Path(path), format)
        refused = Isolation(caged=False, programs_allowed=False, reason=refusal).refuse_program(fmt)
        if refusal is not None and refused is not None:
            raise UnsafeModelFile(refused)
        teacher: Any = load_teacher(
            ModelFile(Path(path), fmt, arch, arch_config), "cpu", input_shape=input_shape
        )
    except BaseException as exc:
        if _passthrough(exc):
            raise
        raise ModelInvalid(f"the model could not be opened: {type(exc).__name__}: {exc}") from None
    info = teacher.info
    return ModelInspection(
        format=fmt,
        info=info,
        parameters=teacher.parameters,
        arch=info.arch,
        arch_config=getattr(teacher, "arch_config", None),
        trainable=fmt != "onnx",
        hf=getattr(teacher, "hf", None),
    ).model_dump(mode="json")


def dataset_in_child(path: str, filename: str, options: dict[str, Any]) -> dict[str, Any]:
    """Sandbox side of :func:`inspect_dataset_file`."""
    from core.distill.data import dataset_format, dataset_info, load_transfer_set

    try:
        fmt = dataset_format(filename)
        ts = load_transfer_set(Path(path), fmt, options=options, val_fraction=0.0)
    except BaseException as exc:
        if _passthrough(exc):
            raise
        raise DatasetInvalid(
            f"the dataset could not be read: {type(exc).__name__}: {exc}"
        ) from None
    return DatasetInspection(format=fmt, info=dataset_info(ts)).model_dump(mode="json")
