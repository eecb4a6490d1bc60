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

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from ai_handler_dagster.db.engine import is_sqlite
from ai_handler_dagster.db.models import ApiRequestCount


@dataclass(frozen=True)
class Verdict:
    """The request's count this minute, the limit, and when to retry if over it."""

    count: int
    limit: int
    retry_after_s: int

    @property
    def allowed(self) -> bool:
        return self.count <= self.limit


def count_request(
    session: Session, key_id: str, limit: int, *, clock: Callable[[], float] = time.time
) -> Verdict:
    """Count one request of ``key_id`` against ``limit`` a minute, in the caller's transaction
    (the key's lookup shares it: one transaction per request)."""
    now = clock()
    minute = int(now // 60)
    dialect = sqlite if is_sqlite(session) else postgresql
    insert = dialect.insert(ApiRequestCount).values(key_id=key_id, minute=minute, count=1)
    upsert = insert.on_conflict_do_update(
        index_elements=[ApiRequestCount.key_id, ApiRequestCount.minute],
        set_={"count": ApiRequestCount.count + 1},
    ).returning(ApiRequestCount.count)
    count = int(session.execute(upsert).scalar_one())
    if count == 1:
        session.execute(
            sa.delete(ApiRequestCount).where(
                ApiRequestCount.key_id == key_id, ApiRequestCount.minute < minute
            )
        )
    retry = max(1, math.ceil((minute + 1) * 60 - now))
    return Verdict(count, limit, retry)
