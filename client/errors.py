"""Errors the SDK raises: one class per API error ``code``, all under :class:`DistillAPIError`.

::

    DistillAPIError                   any error answer of the API (and the SDK's own failures)
    ├── InvalidRequest                invalid_request          422
    ├── InvalidSpec                   invalid_spec             422
    │   └── ShapeMismatch             shape_mismatch           422
    ├── UnsafeModelFile               unsafe_model_file        422
    ├── ModelInvalid                  model_invalid            422
    ├── DatasetInvalid                dataset_invalid          422
    ├── Unauthorized                  unauthorized             401
    ├── NotFound                      not_found                404
    ├── Conflict                      conflict                 409
    ├── PayloadTooLarge               payload_too_large        413
    ├── RangeNotSatisfiable           range_not_satisfiable    416
    ├── NotReady                      not_ready                503
    ├── ServerError                   internal, any other 5xx
    ├── ServiceUnreachable            unreachable              (no answer at all)
    ├── ChecksumMismatch              checksum_mismatch        (a download's sha256 is wrong)
    └── JobFailed                     the job's error.code     (a job that ended failed/cancelled)
"""

from __future__ import annotations

from typing import Any

import httpx


class DistillAPIError(Exception):
    """An error answer of the distill API: its ``code``, message, details and HTTP status."""

    code = "error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        details: dict[str, Any] | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or type(self).code
        self.details = details or {}
        self.status = status

    @property
    def field(self) -> str | None:
        """The request or spec field the error names, when it names one."""
        value = self.details.get("field")
        return str(value) if value else None

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class InvalidRequest(DistillAPIError):
    code = "invalid_request"


class InvalidSpec(DistillAPIError):
    code = "invalid_spec"


class ShapeMismatch(InvalidSpec):
    code = "shape_mismatch"


class UnsafeModelFile(DistillAPIError):
    code = "unsafe_model_file"


class ModelInvalid(DistillAPIError):
    code = "model_invalid"


class DatasetInvalid(DistillAPIError):
    code = "dataset_invalid"


class Unauthorized(DistillAPIError):
    code = "unauthorized"


class NotFound(DistillAPIError):
    code = "not_found"


class Conflict(DistillAPIError):
    code = "conflict"


class PayloadTooLarge(DistillAPIError):
    code = "payload_too_large"


class RangeNotSatisfiable(DistillAPIError):
    code = "range_not_satisfiable"


class NotReady(DistillAPIError):
    code = "not_ready"


class ServerError(DistillAPIError):
    code = "internal"


class ServiceUnreachable(DistillAPIError):
    code = "unreachable"


class ChecksumMismatch(DistillAPIError):
    code = "checksum_mismatch"


class JobFailed(DistillAPIError):
    """A job ended ``failed`` or ``cancelled``; ``code`` is the job's ``error.code``."""

    code = "job_failed"

    def __init__(self, message: str, *, job: Any = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.job = job


ERRORS_BY_CODE: dict[str, type[DistillAPIError]] = {
    cls.code: cls
    for cls in (
        InvalidRequest,
        InvalidSpec,
        ShapeMismatch,
        UnsafeModelFile,
        ModelInvalid,
        DatasetInvalid,
        Unauthorized,
        NotFound,
        Conflict,
        PayloadTooLarge,
        RangeNotSatisfiable,
        NotReady,
        ServerError,
    )
}


def error_from_response(response: httpx.Response) -> DistillAPIError:
    """The typed error for an error answer (the ``{"error": {...}}`` envelope, or any body)."""
    code, message, details = "", "", {}
    try:
        body = response.json()
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict):
            code = str(error.get("code") or "")
            message = str(error.get("message") or "")
            details = error.get("details") if isinstance(error.get("details"), dict) else {}
    except ValueError:
        pass
    status = response.status_code
    if not message:
        text = response.text.strip().splitlines()[0][:200] if response.text.strip() else ""
        message = f"HTTP {status} from {response.request.url}" + (f": {text}" if text else "")
    cls = ERRORS_BY_CODE.get(code)
    if cls is None:
        cls = ServerError if status >= 500 else DistillAPIError
    return cls(message, code=code or None, details=details, status=status)
