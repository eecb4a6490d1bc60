"""User tokens: short-lived, read-only credentials for one user, minted by an application's backend.

An API key acts for every user, so it must never reach a browser; and a browser's
``EventSource`` cannot send an ``Authorization`` header anyway. The app's backend calls
``POST /v1/tokens`` with its key and hands the token to the page, which reads that one user's
generations, credits and events with it (``?access_token=`` or ``Authorization: Bearer``).

A token is a JWT (HS256, PyJWT), with its parent key's id as ``kid`` and the claims ``sub``
(the user), ``scope`` (``read``), ``iat`` and ``exp``. It is signed with a key derived from the
parent key's stored secret hash, so every worker and host verifies it from the database it
already reads, nothing is stored per token, and revoking the parent key ends its tokens at the
next request. Checking a token reads the parent key (one primary-key lookup) and counts the
request against the parent key's per-minute limit: a leaked token cannot outrun its key.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass

import jwt
import sqlalchemy as sa

from ai_handler_dagster.api import keys
from ai_handler_dagster.domain import check_identifier
from ai_handler_dagster.errors import AiHandlerError

ALGORITHM = "HS256"
ISSUER = "ai-handler"
#: A token's lifetime when the request names none, and the longest one may ask for.
DEFAULT_TTL_S = 900
MAX_TTL_S = 86_400
_PURPOSE = b"ai-handler user token v1"


class TokenRefused(AiHandlerError, ValueError):
    """Why a presented token is not accepted (expired, malformed, its key revoked...)."""


@dataclass(frozen=True)
class Token:
    """A minted token and what it allows."""

    token: str
    user: str
    scopes: tuple[str, ...]
    expires_at: int


@dataclass(frozen=True)
class Holder:
    """Who presents a valid token: its user and its parent key."""

    user: str
    key: keys.Caller


def _signing_key(secret_sha256: str) -> bytes:
    # Derived, not the stored hash itself: the JWT key is useless for anything else.
    return hmac.new(bytes.fromhex(secret_sha256), _PURPOSE, hashlib.sha256).digest()


def looks_like_token(presented: str) -> bool:
    """A JWT (three dot-separated parts) rather than an ``aih_`` key."""
    return presented.count(".") == 2 and not presented.startswith(keys.PREFIX + "_")


def mint(
    connection: sa.Connection,
    caller: keys.Caller,
    user: str,
    *,
    ttl_s: int = DEFAULT_TTL_S,
    clock: Callable[[], float] = time.time,
) -> Token:
    """A read-only token for ``user``, valid ``ttl_s`` seconds, signed for ``caller``'s key."""
    user = check_identifier(user, "user", error=TokenRefused)
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, int) or not 1 <= ttl_s <= MAX_TTL_S:
        raise TokenRefused(f"ttl_s must be a whole number of seconds from 1 to {MAX_TTL_S}")
    row = connection.execute(keys.CALLER_BY_ID, {"key_id": caller.key_id}).first()
    if row is None or row.revoked_at is not None:
        raise TokenRefused(f"the key {caller.key_id} is revoked")
    now = int(clock())
    claims = {
        "iss": ISSUER,
        "sub": user,
        "scope": keys.READ,
        "iat": now,
        "exp": now + ttl_s,
    }
    token = jwt.encode(
        claims,
        _signing_key(row.secret_sha256),
        algorithm=ALGORITHM,
        headers={"kid": caller.key_id},
    )
    return Token(token, user, (keys.READ,), now + ttl_s)


def verify(
    connection: sa.Connection, presented: str, *, clock: Callable[[], float] = time.time
) -> Holder:
    """The holder of a presented token, or ``TokenRefused`` saying why not."""
    try:
        header = jwt.get_unverified_header(presented)
    except jwt.InvalidTokenError as exc:
        raise TokenRefused("the token is malformed") from exc
    key_id = header.get("kid")
    if not isinstance(key_id, str) or header.get("alg") != ALGORITHM:
        raise TokenRefused("the token is malformed")
    row = connection.execute(keys.CALLER_BY_ID, {"key_id": key_id}).first()
    if row is None:
        raise TokenRefused("the token's key is unknown")
    try:
        claims = jwt.decode(
            presented,
            _signing_key(row.secret_sha256),
            algorithms=[ALGORITHM],
            issuer=ISSUER,
            options={"require": ["exp", "iat", "sub", "iss"]},
            leeway=0,
            # PyJWT compares exp with its own clock; ours is checked below as well.
        )
    except jwt.ExpiredSignatureError as exc:
        raise TokenRefused("the token has expired") from exc
    except jwt.InvalidTokenError as exc:
        raise TokenRefused("the token's signature or claims are not valid") from exc
    if int(claims["exp"]) <= clock():
        raise TokenRefused("the token has expired")
    if row.revoked_at is not None:
        raise TokenRefused(f"the token's key {key_id} is revoked")
    if claims.get("scope") != keys.READ or not isinstance(claims["sub"], str):
        raise TokenRefused("the token's claims are not valid")
    caller = keys.caller_from_row(row)
    if not caller.has(keys.READ):
        raise TokenRefused(f"the token's key {key_id} lacks the 'read' scope")
    return Holder(claims["sub"], caller)
