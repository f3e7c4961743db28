"""Who is calling: the tenant of a bearer key (or ``default`` with auth off), briefly cached.

Most requests come from a handful of keys, so a short-lived cache saves each of them a database
round trip and a thread hop. A revoked key stops working once its entry expires
(``DISTILL_AUTH_CACHE_SECONDS``; 0 turns the cache off). Failed lookups are never cached.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.auth import DEFAULT_TENANT, authenticate, get_or_create_tenant
from core.errors import Unauthorized
from core.models import Tenant

MAX_ENTRIES = 10_000


class TenantResolver:
    """Maps an ``Authorization`` header to its tenant, remembering answers for ``ttl`` seconds."""

    def __init__(self, sessions: Callable[[], Session], *, auth: bool, ttl: float) -> None:
        self.sessions = sessions
        self.auth = auth
        self.ttl = ttl
        self._entries: dict[str, tuple[float, Tenant]] = {}
        self._lock = threading.Lock()

    def cache_key(self, authorization: str) -> str:
        """What the answer for this header is cached under (never the key itself)."""
        if not self.auth:
            return DEFAULT_TENANT
        return hashlib.sha256(authorization.encode()).hexdigest()

    def cached(self, authorization: str) -> Tenant | None:
        """The tenant remembered for this header, if still fresh; never touches the database."""
        entry = self._entries.get(self.cache_key(authorization))
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def resolve(self, authorization: str) -> Tenant:
        """Look the caller up in the database (blocking) and remember the answer."""
        with self.sessions() as session:
            tenant = self._lookup(session, authorization)
            session.commit()  # the default tenant may just have been created
        # A detached copy with plain attributes: safe to share between requests and threads.
        snapshot = Tenant(id=tenant.id, name=tenant.name, created_at=tenant.created_at)
        if self.ttl > 0 or not self.auth:  # the default tenant never changes
            with self._lock:
                if len(self._entries) >= MAX_ENTRIES:
                    self._entries.clear()
                expires = time.monotonic() + (self.ttl if self.auth else float("inf"))
                self._entries[self.cache_key(authorization)] = (expires, snapshot)
        return snapshot

    def _lookup(self, session: Session, authorization: str) -> Tenant:
        if not self.auth:
            tenant = session.scalar(select(Tenant).where(Tenant.name == DEFAULT_TENANT))
            return tenant or get_or_create_tenant(session, DEFAULT_TENANT)
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthorized(
                "missing API key; send the header 'Authorization: Bearer <key>' "
                "(create a key with `distill keys create --tenant NAME`)"
            )
        return authenticate(session, key.strip())
