"""A request for a job: who asks, the spec as sent, its Idempotency-Key; and their limits."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from core.models import Tenant

# A spec is a few KiB; anything near this is a mistake, refused before it fills memory.
MAX_SPEC_BYTES = 1024 * 1024
# The Idempotency-Key header of POST /v1/jobs and /v1/searches: 1 to this many characters.
MAX_IDEMPOTENCY_KEY_LENGTH = 200


@dataclass
class JobRequest:
    """One job asked for: who asks, the spec as sent, and its Idempotency-Key."""

    tenant: Tenant
    body: Any
    idempotency_key: str | None = None
    # The body's hash, which a key's later uses are checked against (none without a key).
    digest: str | None = field(init=False)

    def __post_init__(self) -> None:
        self.digest = None if self.idempotency_key is None else request_hash(self.body)


def request_hash(body: Any) -> str:
    """The hash of a request's body that an Idempotency-Key's later uses must match."""
    return hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
