"""Creating jobs: each spec checked against the tenant's uploads, then the jobs stored.

- ``request.py``: a request (tenant, spec as sent, Idempotency-Key) and its limits;
- ``idempotency.py``: the job a request's key made before;
- ``uploads.py``: the spec checked against the uploads it names, completed, its budget checked;
- ``rows.py``: the queue a job goes to, and the rows it is stored as;
- ``batch.py``: :func:`create_jobs`, many requests in one lookup, one insert and one commit;
- ``statements.py``: the database driver's side, one object per database (``postgres.py``,
  ``dbapi.py``), chosen once by :func:`statements_for`.

The API's job intake (``api/job_intake.py``) batches ``POST /v1/jobs`` requests into
:func:`create_jobs`; a budget search (``api/search_intake.py``) checks and stores its child jobs
with the same pieces.
"""

from core.job_creation.batch import RETRY_AFTER_SECONDS, JobOrError, StoredJob, create_jobs
from core.job_creation.request import (
    MAX_IDEMPOTENCY_KEY_LENGTH,
    MAX_SPEC_BYTES,
    JobRequest,
    request_hash,
)
from core.job_creation.statements import JobStatements, statements_for

__all__ = [
    "MAX_IDEMPOTENCY_KEY_LENGTH",
    "MAX_SPEC_BYTES",
    "RETRY_AFTER_SECONDS",
    "JobOrError",
    "JobRequest",
    "JobStatements",
    "StoredJob",
    "create_jobs",
    "request_hash",
    "statements_for",
]
