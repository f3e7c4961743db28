"""The exception tree of distill. Every error has a stable ``code``.

::

    DistillError                      internal         500
    ├── ClientError                   (4xx: the caller can fix it)
    │   ├── InvalidSpec               invalid_spec     422
    │   │   ├── ShapeMismatch         shape_mismatch   422
    │   │   └── OverBudget            over_budget      422
    │   ├── InvalidRequest            invalid_request  422  (api/errors.py: a bad parameter)
    │   ├── UnsafeModelFile           unsafe_model_file 422
    │   ├── ModelInvalid              model_invalid    422
    │   ├── DatasetInvalid            dataset_invalid  422
    │   ├── Unauthorized              unauthorized     401
    │   ├── NotFound                  not_found        404
    │   ├── Conflict                  conflict         409
    │   ├── PayloadTooLarge           payload_too_large 413
    │   │   └── StorageQuotaExceeded  quota_exceeded   413
    │   ├── QuotaExceeded             quota_exceeded   429
    │   └── RangeNotSatisfiable       range_not_satisfiable 416
    ├── NotReady                      not_ready        503  (api/errors.py)
    └── JobError                      (a job that ran and failed; the job's error.code)
        ├── TrainingDiverged          training_diverged
        ├── OutOfMemory               out_of_memory
        ├── OutOfDisk                 out_of_disk
        ├── JobTimeout                timeout
        ├── WorkerLost                worker_lost
        ├── ExportFailed              export_failed
        ├── CompressionFailed         compression_failed
        └── Cancelled                 cancelled

The API maps this tree to HTTP in one place (``api/errors.py``); the worker maps it to a job's
``error`` object with :func:`job_error`.
"""

from __future__ import annotations

from typing import Any


class DistillError(Exception):
    """Base of every error distill raises on purpose."""

    code = "internal"
    http_status = 500

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        return body


class ClientError(DistillError):
    """The request or the uploaded file is wrong; the message says how to fix it."""

    code = "bad_request"
    http_status = 400

    def __init__(
        self, message: str, *, field: str | None = None, details: dict[str, Any] | None = None
    ) -> None:
        details = dict(details or {})
        if field is not None:
            details.setdefault("field", field)  # the dotted name of what to fix
        super().__init__(message, details=details)
        self.field = field


class InvalidSpec(ClientError):
    code = "invalid_spec"
    http_status = 422


class ShapeMismatch(InvalidSpec):
    code = "shape_mismatch"


class OverBudget(InvalidSpec):
    """The job is larger than the service runs (parameters, memory, steps or minutes)."""

    code = "over_budget"


class UnsafeModelFile(ClientError):
    code = "unsafe_model_file"
    http_status = 422


class ModelInvalid(ClientError):
    code = "model_invalid"
    http_status = 422


class DatasetInvalid(ClientError):
    code = "dataset_invalid"
    http_status = 422


class Unauthorized(ClientError):
    code = "unauthorized"
    http_status = 401


class NotFound(ClientError):
    code = "not_found"
    http_status = 404


class Conflict(ClientError):
    code = "conflict"
    http_status = 409


class PayloadTooLarge(ClientError):
    code = "payload_too_large"
    http_status = 413


class StorageQuotaExceeded(PayloadTooLarge):
    """The tenant's uploads would hold more bytes than its quota."""

    code = "quota_exceeded"


class QuotaExceeded(ClientError):
    """The tenant has as many queued and running jobs as it may; it can retry later."""

    code = "quota_exceeded"
    http_status = 429

    def __init__(self, message: str, *, retry_after: int, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.headers = {"Retry-After": str(retry_after)}


class RangeNotSatisfiable(ClientError):
    code = "range_not_satisfiable"
    http_status = 416


class JobError(DistillError):
    """A job ran and failed; ``code`` becomes the job's ``error.code``."""

    code = "internal"


class TrainingDiverged(JobError):
    code = "training_diverged"


class OutOfMemory(JobError):
    code = "out_of_memory"


class OutOfDisk(JobError):
    """The job wrote more than its worker allows (``DISTILL_JOB_DISK_MB``)."""

    code = "out_of_disk"


class JobTimeout(JobError):
    code = "timeout"


class WorkerLost(JobError):
    code = "worker_lost"


class ExportFailed(JobError):
    code = "export_failed"


class CompressionFailed(JobError):
    code = "compression_failed"


class Cancelled(JobError):
    code = "cancelled"


def job_error(exc: BaseException) -> dict[str, Any]:
    """The job's ``error`` object for any exception: its code and message, never a traceback."""
    if isinstance(exc, DistillError):
        return exc.to_dict()
    if isinstance(exc, MemoryError):
        return OutOfMemory(
            "the job ran out of memory; use a smaller batch_size or student"
        ).to_dict()
    return {"code": "internal", "message": f"{type(exc).__name__}: {exc}"}
