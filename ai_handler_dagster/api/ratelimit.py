"""The per-key request limit, shared by every worker and host: a counter per key and minute.

Each request adds one to its key's row for the current minute with one upsert that returns the
new count (``INSERT ... ON CONFLICT DO UPDATE ... RETURNING``, atomic on PostgreSQL and SQLite);
a count over the limit is refused with the seconds left in the minute as ``Retry-After``. A
fixed window lets a key make up to twice its limit across a minute's boundary; that is the
price of one statement per request, and the limit exists to stop runaway clients, not to meter.
A key's first request of a minute deletes its older rows, so the table stays small.

Written here rather than taken from a rate-limiting library: the ones for ASGI keep their
counters in process memory or in Redis, and this project's one shared store is its database.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from ai_handler_dagster.api import keys
from ai_handler_dagster.db.engine import is_sqlite
from ai_handler_dagster.db.models import ApiKey, ApiRequestCount


@dataclass(frozen=True)
class Verdict:
    """The request's count this minute, the limit, and when to retry if over it."""

    count: int
    limit: int
    retry_after_s: int

    @property
    def allowed(self) -> bool:
        return self.count <= self.limit


def _upsert(dialect: Any) -> Any:
    insert = dialect.insert(ApiRequestCount).values(
        key_id=sa.bindparam("key_id"), minute=sa.bindparam("minute"), count=1
    )
    return insert.on_conflict_do_update(
        index_elements=[ApiRequestCount.key_id, ApiRequestCount.minute],
        set_={"count": ApiRequestCount.count + 1},
    ).returning(ApiRequestCount.count)


#: Built once per dialect: every request runs one of them.
_UPSERT = {"postgresql": _upsert(postgresql), "sqlite": _upsert(sqlite)}
_FORGET = sa.delete(ApiRequestCount).where(
    ApiRequestCount.key_id == sa.bindparam("key_id"),
    ApiRequestCount.minute < sa.bindparam("minute"),
)


def count_request(
    connection: sa.Connection, key_id: str, limit: int, *, clock: Callable[[], float] = time.time
) -> Verdict:
    """Count one request of ``key_id`` against ``limit`` a minute.

    Run it outside a longer transaction (the API runs it in autocommit): every request of the
    key updates the same row, so the row must stay locked only for the statement itself."""
    now = clock()
    minute = int(now // 60)
    params = {"key_id": key_id, "minute": minute}
    upsert = _UPSERT["sqlite" if is_sqlite(connection) else "postgresql"]
    count = int(connection.execute(upsert, params).scalar_one())
    if count == 1:
        connection.execute(_FORGET, params)
    return Verdict(count, limit, _retry_after(minute, now))


def _retry_after(minute: int, now: float) -> int:
    return max(1, math.ceil((minute + 1) * 60 - now))


def _admit_statement() -> sa.Select[Any]:
    key = sa.select(*keys.CALLER_COLUMNS).where(ApiKey.key_id == sa.bindparam("key_id")).cte("key")
    counted = (
        postgresql.insert(ApiRequestCount)
        .from_select(
            ["key_id", "minute", "count"],
            sa.select(key.c.key_id, sa.bindparam("minute", type_=sa.BigInteger), sa.literal(1))
            # Only a valid key's request counts: a wrong secret must not spend its limit.
            .where(key.c.revoked_at.is_(None), key.c.secret_sha256 == sa.bindparam("digest")),
        )
        .on_conflict_do_update(
            index_elements=[ApiRequestCount.key_id, ApiRequestCount.minute],
            set_={"count": ApiRequestCount.count + 1},
        )
        .returning(ApiRequestCount.count)
        .cte("counted")
    )
    return sa.select(key, sa.select(counted.c.count).scalar_subquery().label("request_count"))


#: The key's row and its request counted, in one PostgreSQL statement.
_ADMIT = _admit_statement()


@dataclass(frozen=True)
class Admission:
    """A request's key check: the caller (None: the key is malformed, unknown or revoked) and,
    for a caller, its request's count against its limit."""

    caller: keys.Caller | None
    verdict: Verdict | None


def admit(
    connection: sa.Connection,
    presented: str,
    *,
    default_limit: int,
    clock: Callable[[], float] = time.time,
) -> Admission:
    """Check a presented key and count its request against the key's limit (``default_limit``
    for a key without its own). On PostgreSQL one round trip (the lookup and the upsert in one
    statement); on SQLite the two statements. Run it outside a longer transaction, as
    ``count_request``."""
    parsed = keys.parse(presented)
    if parsed is None:
        return Admission(None, None)
    key_id, secret = parsed
    now = clock()
    if is_sqlite(connection):
        caller = keys.authenticate(connection, presented)
        if caller is None:
            return Admission(None, None)
        limit = caller.rate_per_minute or default_limit
        return Admission(caller, count_request(connection, key_id, limit, clock=lambda: now))
    minute = int(now // 60)
    row = connection.execute(
        _ADMIT, {"key_id": key_id, "minute": minute, "digest": keys.digest(secret)}
    ).first()
    caller = keys.caller_of(row, secret)
    if caller is None or row is None or row.request_count is None:
        return Admission(None, None)
    count = int(row.request_count)
    if count == 1:
        connection.execute(_FORGET, {"key_id": key_id, "minute": minute})
    limit = caller.rate_per_minute or default_limit
    return Admission(caller, Verdict(count, limit, _retry_after(minute, now)))
