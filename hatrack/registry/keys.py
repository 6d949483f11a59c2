"""API keys: a random secret shown once, stored only as its sha256; fnmatch patterns
over adapter names decide what a key's tenant may use."""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import secrets
from typing import TYPE_CHECKING

from sqlmodel import select

from hatrack.registry.errors import InvalidNameError, NotFoundError
from hatrack.registry.names import validate_name, validate_pattern
from hatrack.registry.records import KeyRecord
from hatrack.registry.tables import ApiKey, utcnow

if TYPE_CHECKING:
    from hatrack.registry.registry import Registry

SECRET_PREFIX = "hr-"


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def create_key(reg: "Registry", tenant: str, patterns: list[str]) -> tuple[KeyRecord, str]:
    validate_name(tenant)
    if not patterns:
        raise InvalidNameError("a key needs at least one --allow pattern (e.g. 'acme-*')")
    patterns = [validate_pattern(p) for p in patterns]
    secret = SECRET_PREFIX + secrets.token_urlsafe(24)  # 32 urlsafe characters

    def add(session) -> KeyRecord:
        row = ApiKey(id="key_" + secrets.token_hex(6), tenant=tenant, patterns=patterns,
                     secret_sha256=_digest(secret))
        session.add(row)
        session.flush()
        return KeyRecord.of(row)

    return reg.write(add), secret


def authenticate(reg: "Registry", secret: str) -> KeyRecord | None:
    """The key record this secret belongs to, or None (unknown or revoked)."""
    if not isinstance(secret, str) or not secret.startswith(SECRET_PREFIX) or len(secret) > 128:
        return None
    digest = _digest(secret)
    with reg.session() as session:
        row = session.exec(select(ApiKey).where(ApiKey.secret_sha256 == digest)).first()
    if row is None or not hmac.compare_digest(row.secret_sha256, digest) or row.revoked is not None:
        return None
    return KeyRecord.of(row)


def has_keys(reg: "Registry") -> bool:
    with reg.session() as session:
        return session.exec(select(ApiKey.id).where(ApiKey.revoked.is_(None)).limit(1)).first() is not None


def list_keys(reg: "Registry") -> list[KeyRecord]:
    with reg.session() as session:
        rows = session.exec(select(ApiKey).order_by(ApiKey.created, ApiKey.id)).all()
    return [KeyRecord.of(r) for r in rows]


def revoke_key(reg: "Registry", key_id: str) -> None:
    def apply(session) -> None:
        row = session.get(ApiKey, key_id)
        if row is None:
            raise NotFoundError(f"unknown key id {key_id!r} (see `hatrack keys list`)")
        if row.revoked is None:
            row.revoked = utcnow()
            session.add(row)

    reg.write(apply)


def key_allows(key: KeyRecord, model_name: str) -> bool:
    """Whether the key's patterns admit this adapter name (any `@version` is ignored)."""
    name = model_name.split("@", 1)[0]
    return key.revoked is None and any(fnmatch.fnmatchcase(name, p) for p in key.patterns)
