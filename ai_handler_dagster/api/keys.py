"""API keys: created and revoked by the operator (``ai-handler keys``), kept only as hashes.

A key reads ``aih_<key id>_<secret>``: the key id (12 hex characters) is public and names the
key in lists and logs; the secret is 32 random bytes (URL-safe base64), and only its SHA-256 is
stored (``db.models.ApiKey`` says why a fast hash is right for a random secret). The full key is
shown once, when created.

Scopes: ``read`` (status, lists, models, credits), ``submit`` (submit and cancel generations;
includes nothing else) and ``admin`` (grants credits; has every scope).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from ai_handler_dagster.db.models import ApiKey, utcnow
from ai_handler_dagster.domain import MAX_PRIORITY, MIN_PRIORITY, check_identifier
from ai_handler_dagster.errors import AiHandlerError

READ, SUBMIT, ADMIN = "read", "submit", "admin"
SCOPES = (READ, SUBMIT, ADMIN)
PREFIX = "aih"
_KEY = re.compile(r"aih_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")


class KeyRefused(AiHandlerError, ValueError):
    """A key request the operator must fix (unknown scope, bad name, unknown key id)."""


@dataclass(frozen=True)
class Caller:
    """Who is calling: the key's id, name, scopes and limits (never its secret)."""

    key_id: str
    name: str
    scopes: frozenset[str]
    max_priority: int | None
    rate_per_minute: int | None

    def has(self, scope: str) -> bool:
        return scope in self.scopes or ADMIN in self.scopes


@dataclass(frozen=True)
class KeyInfo:
    """A key as ``keys list`` shows it."""

    key_id: str
    name: str
    scopes: tuple[str, ...]
    max_priority: int | None
    rate_per_minute: int | None
    created_at: datetime
    revoked_at: datetime | None


def digest(secret: str) -> str:
    """What is stored of a secret (its SHA-256, hex)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def _check_scopes(scopes: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    if not scopes:
        raise KeyRefused(f"a key needs at least one scope ({', '.join(SCOPES)})")
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown:
        raise KeyRefused(f"unknown scope {unknown[0]!r}: use {', '.join(SCOPES)}")
    return tuple(s for s in SCOPES if s in scopes)


def create(
    session: Session,
    *,
    name: str,
    scopes: list[str] | tuple[str, ...],
    max_priority: int | None = None,
    rate_per_minute: int | None = None,
) -> tuple[str, KeyInfo]:
    """Create a key; returns the full key (shown once, never stored) and what is stored."""
    name = check_identifier(name, "key name", error=KeyRefused)
    chosen = _check_scopes(scopes)
    if max_priority is not None and not (
        not isinstance(max_priority, bool)
        and isinstance(max_priority, int)
        and MIN_PRIORITY <= max_priority <= MAX_PRIORITY
    ):
        raise KeyRefused(
            f"max priority must be a whole number from {MIN_PRIORITY} to {MAX_PRIORITY}"
        )
    if rate_per_minute is not None and (
        isinstance(rate_per_minute, bool)
        or not isinstance(rate_per_minute, int)
        or rate_per_minute < 1
    ):
        raise KeyRefused("the rate limit must be a whole number of requests a minute, at least 1")
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    row = ApiKey(
        key_id=key_id,
        secret_sha256=digest(secret),
        name=name,
        scopes=" ".join(chosen),
        max_priority=max_priority,
        rate_per_minute=rate_per_minute,
        created_at=utcnow(),
    )
    session.add(row)
    session.flush()
    return f"{PREFIX}_{key_id}_{secret}", _info(row)


def _info(row: ApiKey) -> KeyInfo:
    return KeyInfo(
        row.key_id,
        row.name,
        tuple(row.scopes.split()),
        row.max_priority,
        row.rate_per_minute,
        row.created_at,
        row.revoked_at,
    )


def list_keys(session: Session) -> list[KeyInfo]:
    """Every key, newest first, revoked ones included."""
    rows = session.scalars(sa.select(ApiKey).order_by(ApiKey.created_at.desc(), ApiKey.key_id))
    return [_info(r) for r in rows]


def revoke(session: Session, key_id: str) -> KeyInfo:
    """Revoke a key (by its id, or the full key): refused from the next request on.
    Revoking twice keeps the first time."""
    match = _KEY.fullmatch(key_id)
    wanted = match.group(1) if match else key_id
    row = session.get(ApiKey, wanted, with_for_update=True)
    if row is None:
        raise KeyRefused(f"unknown key id {key_id[:16]!r}")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.flush()
    return _info(row)


#: The columns a request's key check reads: one primary-key lookup, built once.
CALLER_COLUMNS = (
    ApiKey.key_id,
    ApiKey.secret_sha256,
    ApiKey.name,
    ApiKey.scopes,
    ApiKey.max_priority,
    ApiKey.rate_per_minute,
    ApiKey.revoked_at,
)
#: A key row (``CALLER_COLUMNS``) by its id.
CALLER_BY_ID = sa.select(*CALLER_COLUMNS).where(ApiKey.key_id == sa.bindparam("key_id"))


def parse(presented: str) -> tuple[str, str] | None:
    """A presented key's id and secret, or None if it is not shaped like a key."""
    match = _KEY.fullmatch(presented.strip())
    return None if match is None else (match.group(1), match.group(2))


def caller_of(row: Any, secret: str) -> Caller | None:
    """The caller a key row (``CALLER_COLUMNS``) stands for if ``secret`` is its secret and it
    is not revoked; None otherwise. The comparison of hashes is constant-time."""
    if row is None or row.revoked_at is not None:
        return None
    if not hmac.compare_digest(row.secret_sha256, digest(secret)):
        return None
    return caller_from_row(row)


def caller_from_row(row: Any) -> Caller:
    """The caller a key row (``CALLER_COLUMNS``) stands for, without checking any secret."""
    return Caller(
        row.key_id,
        row.name,
        frozenset(row.scopes.split()),
        row.max_priority,
        row.rate_per_minute,
    )


def authenticate(connection: sa.Connection | Session, presented: str) -> Caller | None:
    """The caller a presented key belongs to, or None if it is malformed, unknown or revoked.
    One primary-key read (a Core statement: every request pays it)."""
    parsed = parse(presented)
    if parsed is None:
        return None
    key_id, secret = parsed
    return caller_of(connection.execute(CALLER_BY_ID, {"key_id": key_id}).first(), secret)
