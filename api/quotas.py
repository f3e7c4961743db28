"""A tenant's storage quota: how many more bytes its next upload may hold.

The quota counts the bytes of the tenant's stored models and datasets
(``DISTILL_MAX_TENANT_STORAGE_BYTES``). An upload is streamed with the smaller of that
remainder and the per-upload limit, so a tenant over its quota is stopped while it sends.
Two uploads racing at the edge can each pass it by one file: a bound, not an exact count.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select, union_all
from sqlalchemy.orm import Session

from core.config import Settings
from core.errors import PayloadTooLarge, StorageQuotaExceeded
from core.models import Dataset, Model


@dataclass(frozen=True)
class UploadLimit:
    """The most bytes this upload may hold, and whether the quota (not the per-upload limit)
    is what sets it."""

    max_bytes: int
    quota: int
    used: int

    @property
    def by_quota(self) -> bool:
        return self.max_bytes == self.quota - self.used

    def refusal(self, exc: PayloadTooLarge) -> PayloadTooLarge:
        """The error for an upload that passed ``max_bytes``: the quota's when it set it."""
        return self.over_quota() if self.by_quota else exc

    def over_quota(self) -> StorageQuotaExceeded:
        return StorageQuotaExceeded(
            f"this tenant's uploads would hold more than its quota of {self.quota:,} bytes "
            f"({self.used:,} used); delete models or datasets it no longer needs",
            details={"quota_bytes": self.quota, "used_bytes": self.used},
        )


def stored_bytes(session: Session, tenant_id: str) -> int:
    """The bytes of the tenant's stored models and datasets."""
    sizes = union_all(
        select(Model.size_bytes.label("size")).where(Model.tenant_id == tenant_id),
        select(Dataset.size_bytes.label("size")).where(Dataset.tenant_id == tenant_id),
    ).subquery()
    return int(session.scalar(select(func.coalesce(func.sum(sizes.c.size), 0))) or 0)


def upload_limit(session: Session, tenant_id: str, settings: Settings) -> UploadLimit:
    """The limit for the tenant's next upload; StorageQuotaExceeded when nothing is left."""
    quota = settings.max_tenant_storage_bytes
    used = stored_bytes(session, tenant_id)
    session.rollback()  # end the read: the upload streams for a while
    limit = UploadLimit(min(settings.max_upload_bytes, quota - used), quota, used)
    if limit.max_bytes <= 0:
        raise limit.over_quota()
    return limit
