"""API keys and tenants: keys are random, only their sha256 and a short prefix are stored."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.errors import Conflict, NotFound, Unauthorized
from core.models import ApiKey, Tenant, new_id, utcnow

KEY_MARK = "dk_"
PREFIX_LENGTH = 12  # "dk_" and 9 random characters: enough to tell keys apart, useless to guess
DEFAULT_TENANT = "default"


def generate_key() -> str:
    """A new random API key (``dk_`` + 43 URL-safe characters)."""
    return KEY_MARK + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """The sha256 hex digest stored for a key."""
    return hashlib.sha256(key.encode()).hexdigest()


def get_or_create_tenant(session: Session, name: str) -> Tenant:
    """The tenant called ``name``, created (and flushed) when it does not exist yet."""
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is not None:
        return tenant
    try:
        with session.begin_nested():
            tenant = Tenant(id=new_id("ten"), name=name)
            session.add(tenant)
        return tenant
    except IntegrityError:  # created concurrently
        return session.scalars(select(Tenant).where(Tenant.name == name)).one()


def create_key(session: Session, tenant_name: str) -> tuple[ApiKey, str]:
    """Create a key for a tenant (creating the tenant too); return the row and the key itself.

    The key is returned once and never stored; the caller shows it to the user.
    """
    if not tenant_name.strip():
        raise ValueError("the tenant name must not be empty")
    tenant = get_or_create_tenant(session, tenant_name.strip())
    key = generate_key()
    row = ApiKey(
        id=new_id("key"), tenant_id=tenant.id, key_hash=hash_key(key), prefix=key[:PREFIX_LENGTH]
    )
    session.add(row)
    session.flush()
    return row, key


def revoke_key(session: Session, prefix_or_id: str) -> ApiKey:
    """Revoke the key with this id or prefix (the whole key works too); idempotent.

    NotFound when nothing matches; Conflict when a prefix matches more than one key.
    """
    text = prefix_or_id.strip()
    if not text:
        raise NotFound("give a key id (key_…) or the key's prefix (dk_…)")
    candidates = [text, text[:PREFIX_LENGTH]] if text.startswith(KEY_MARK) else [text]
    rows = session.scalars(
        select(ApiKey).where(
            or_(ApiKey.id == text, ApiKey.key_hash == hash_key(text), ApiKey.prefix.in_(candidates))
        )
    ).all()
    rows = list({r.id: r for r in rows}.values())
    if not rows:
        raise NotFound(f"no API key has the id or prefix {text!r}; `distill keys list` shows them")
    if len(rows) > 1:
        raise Conflict(
            f"{len(rows)} keys start with {text!r}; give the key id instead",
            details={"ids": [r.id for r in rows]},
        )
    row = rows[0]
    if row.revoked_at is None:
        row.revoked_at = utcnow()
    session.flush()
    return row


def authenticate(session: Session, key: str) -> Tenant:
    """The tenant a key belongs to; Unauthorized when the key is unknown or revoked."""
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
    # compare_digest keeps the final comparison constant-time (the lookup is by a hash already).
    if row is None or not hmac.compare_digest(row.key_hash, hash_key(key)):
        raise Unauthorized("the API key is not valid; create one with `distill keys create`")
    if row.revoked_at is not None:
        raise Unauthorized("the API key was revoked; create a new one with `distill keys create`")
    tenant = session.get(Tenant, row.tenant_id)
    assert tenant is not None  # a foreign key guarantees it
    return tenant


def list_keys(session: Session, tenant_name: str | None = None) -> list[tuple[ApiKey, str]]:
    """Keys (newest first) with their tenant's name, optionally of one tenant."""
    query = select(ApiKey, Tenant.name).join(Tenant, Tenant.id == ApiKey.tenant_id)
    if tenant_name is not None:
        query = query.where(Tenant.name == tenant_name)
    return [(k, name) for k, name in session.execute(query.order_by(ApiKey.id.desc())).all()]
