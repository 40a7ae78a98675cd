"""API keys: each belongs to an owner; a key sees only its owner's jobs, datasets and files.

A key reads `<id>.<secret>`. Only the secret's SHA-256 is stored (the secret has 256 random
bits, so a plain hash is enough); the id finds the row and the hashes are compared in
constant time, so response times say nothing about how close a guess was.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from sqlalchemy import select

from app.db import session_scope
from app.models import ApiKey, utcnow

OWNER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
_KEY = re.compile(r"^(key_[0-9a-f]{16})\.([A-Za-z0-9_-]{43})$")


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(owner: str) -> str:
    """A new key for `owner`; the only time its secret exists in clear."""
    if not OWNER.match(owner):
        raise ValueError("an owner is 1-64 letters, digits, '_', '.', '@' or '-'")
    secret = secrets.token_urlsafe(32)
    with session_scope() as session:
        row = ApiKey(owner=owner, secret_sha256=_digest(secret))
        session.add(row)
        session.flush()
        return f"{row.id}.{secret}"


def owner_of(key: str) -> str | None:
    """The owner of a valid, unrevoked key; None for anything else."""
    match = _KEY.match(key)
    if match is None:
        return None
    key_id, secret = match.groups()
    with session_scope() as session:
        row = session.get(ApiKey, key_id)
        stored = row.secret_sha256 if row is not None and row.revoked_at is None else _digest("")
        owner = row.owner if row is not None else None
    if hmac.compare_digest(stored, _digest(secret)) and owner is not None:
        return owner
    return None


def list_keys() -> list[ApiKey]:
    with session_scope() as session:
        return list(session.scalars(select(ApiKey).order_by(ApiKey.created_at)))


def revoke_key(key_id: str) -> bool:
    with session_scope() as session:
        row = session.get(ApiKey, key_id)
        if row is None or row.revoked_at is not None:
            return False
        row.revoked_at = utcnow()
        return True
