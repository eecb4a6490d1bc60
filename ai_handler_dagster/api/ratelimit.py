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
from collections.abc import Callable, Sequence
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


def _admit_many_statement() -> sa.Select[Any]:
    """``_ADMIT`` for many presented keys at once: each key row, and each key's count raised
    by its valid requests (those whose secret matches an unrevoked key) with one upsert per
    key, in the order presented."""
    presented = (
        sa.func.unnest(
            sa.bindparam("key_ids_", type_=postgresql.ARRAY(sa.String())),
            sa.bindparam("digests_", type_=postgresql.ARRAY(sa.String())),
        )
        .table_valued("key_id", "digest", with_ordinality="position")
        .render_derived(name="presented")
    )
    p = sa.select(presented).cte("presented")
    valid = (
        sa.select(p.c.key_id, sa.func.count().label("requests"))
        .join_from(
            p,
            ApiKey,
            sa.and_(
                ApiKey.key_id == p.c.key_id,
                ApiKey.secret_sha256 == p.c.digest,
                ApiKey.revoked_at.is_(None),
            ),
        )
        .group_by(p.c.key_id)
        .cte("valid")
    )
    upsert = postgresql.insert(ApiRequestCount).from_select(
        ["key_id", "minute", "count"],
        # In key order, so two workers' batches lock their common counter rows in one order.
        sa.select(
            valid.c.key_id, sa.bindparam("minute", type_=sa.BigInteger), valid.c.requests
        ).order_by(valid.c.key_id),
    )
    counted = (
        upsert.on_conflict_do_update(
            index_elements=[ApiRequestCount.key_id, ApiRequestCount.minute],
            set_={"count": ApiRequestCount.count + upsert.excluded.count},
        )
        .returning(ApiRequestCount.key_id, ApiRequestCount.count)
        .cte("counted")
    )
    return (
        sa.select(
            *keys.CALLER_COLUMNS,
            counted.c.count.label("request_count"),
            valid.c.requests.label("batch_requests"),
        )
        .select_from(
            p.outerjoin(ApiKey, ApiKey.key_id == p.c.key_id)
            .outerjoin(counted, counted.c.key_id == p.c.key_id)
            .outerjoin(valid, valid.c.key_id == p.c.key_id)
        )
        .order_by(p.c.position)
    )


_ADMIT_MANY = _admit_many_statement()


def admit_many(
    connection: sa.Connection,
    presented: Sequence[str],
    *,
    default_limit: int,
    clock: Callable[[], float] = time.time,
) -> list[Admission]:
    """``admit`` for each of ``presented``, in order, as if one after another: on PostgreSQL one
    statement for all of them (a key's requests in it raise its count together, and each gets
    its own count in order); on SQLite ``admit`` for each."""
    if is_sqlite(connection):
        return [
            admit(connection, one, default_limit=default_limit, clock=clock) for one in presented
        ]
    now = clock()
    minute = int(now // 60)
    parsed = [keys.parse(one) for one in presented]
    asked = [(i, found) for i, found in enumerate(parsed) if found is not None]
    answers = [Admission(None, None)] * len(presented)
    if not asked:
        return answers
    rows = connection.execute(
        _ADMIT_MANY,
        {
            "key_ids_": [key_id for _, (key_id, _secret) in asked],
            "digests_": [keys.digest(secret) for _, (_key_id, secret) in asked],
            "minute": minute,
        },
    ).all()
    next_count: dict[str, int] = {}
    first_of_minute: set[str] = set()  # keys whose count this batch started
    for (i, (_key_id, secret)), row in zip(asked, rows, strict=True):
        caller = keys.caller_of(row, secret) if row.key_id is not None else None
        if caller is None or row.request_count is None:
            continue
        # The key's requests of this batch are its last batch_requests counts, in order.
        count = next_count.get(caller.key_id, int(row.request_count) - int(row.batch_requests))
        count += 1
        next_count[caller.key_id] = count
        if count == 1:
            first_of_minute.add(caller.key_id)
        limit = caller.rate_per_minute or default_limit
        answers[i] = Admission(caller, Verdict(count, limit, _retry_after(minute, now)))
    for key_id in sorted(first_of_minute):
        connection.execute(_FORGET, {"key_id": key_id, "minute": minute})
    return answers
