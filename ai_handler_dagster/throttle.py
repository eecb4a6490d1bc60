"""One pace of creates for the whole deployment: a token bucket in the app database.

Replicate limits creates (about 600 a minute, with bursts; a few a minute for accounts with
little credit). Without a shared pace every run fires its creates and retries its 429s on its
own, and at a low limit a storm of 429s follows. Here every create, in any run, process or host,
first takes a turn from one row of ``create_throttle``:

- **The bucket.** It refills at the configured rate times :data:`PACE` (a little under the
  provider's limit, so that the provider's own bucket keeps a margin and a create that arrives a
  few milliseconds early is not refused) up to ``burst`` tokens. Taking a turn when the bucket is
  empty *promises* the next token (tokens go negative): the caller sleeps until its turn instead
  of polling, so waiting costs one short transaction per create, whatever the crowd.
- **Fed by the provider.** Every create's answer reports ``ratelimit-remaining``: the bucket
  never holds more than the provider says is left (a provider with a smaller burst than
  configured is followed at once). A 429 blocks every create until its ``Retry-After``
  (``blocked_until``); turns promised before the block are void, their holders take new ones, and
  from then on creates are paced without a burst. ``ratelimit-reset`` (when the provider's budget
  is whole again) is not waited for: a bucket refills long before it is full.
- **Atomic.** One transaction per turn: ``SELECT ... FOR UPDATE`` of the row on PostgreSQL; on
  SQLite the engine's ``BEGIN IMMEDIATE`` serializes writers. Times are the hosts' wall clocks
  (kept in step by NTP), since the bucket is shared across hosts.
- **Never fails a generation.** A create waits for its turn as long as it takes, up to its queue
  deadline (``lifetimes.queue_deadline``), which fails and refunds the generation; no attempt of
  the create's retries is spent on waiting or on a 429 under the throttle.
- **A promise unused is returned.** A wait that ends before its create is sent (its run was
  terminated, a sibling's error stopped the step, the step gave up) gives its promised turn
  back in one transaction, unless a newer block voided it already, so no run waits behind
  turns nobody will use.

:class:`Bucket` is the arithmetic, without a database; :class:`CreateThrottle` keeps it in the
row; :class:`Pacer` is what ``ReplicateClient.create`` calls around each create.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from ai_handler_dagster import settings
from ai_handler_dagster.db.engine import is_sqlite, session_scope
from ai_handler_dagster.db.models import CreateThrottle as ThrottleRow
from ai_handler_dagster.errors import DEADLINE_EXCEEDED, AiHandlerError, GenerationError
from ai_handler_dagster.replicate.failures import parse_retry_after

#: The share of the configured limit creates are paced at: the provider's bucket gains a token
#: every ~33 creates, which absorbs the jitter of requests in flight.
PACE = 0.97
#: How long after its turn a create is taken to reach the provider (a transaction, a request).
ARRIVAL_S = 0.1
#: The row every create shares (one provider account).
BUCKET = "replicate"
#: Longest single sleep while waiting for a turn (a stopped step notices within it).
MAX_NAP_S = 1.0

R = TypeVar("R")


class Interrupted(AiHandlerError):
    """The step waiting for a turn is being stopped (its run was terminated)."""


@dataclass(frozen=True)
class Limits:
    """The provider's create limit as configured: ``per_minute`` and ``burst``."""

    per_minute: float
    burst: int

    @classmethod
    def from_settings(cls) -> Limits:
        """``AI_HANDLER_CREATE_RATE_PER_MIN`` and ``AI_HANDLER_CREATE_BURST``."""
        return cls(float(settings.create_rate_per_minute()), settings.create_burst())

    @property
    def rate_s(self) -> float:
        """Tokens per second the bucket refills with (the limit times :data:`PACE`)."""
        return self.per_minute * PACE / 60.0


@dataclass(frozen=True)
class Bucket:
    """The bucket's state: ``tokens`` at ``updated_at`` (epoch seconds; negative tokens are
    turns already promised) and the block, if any. Pure arithmetic: every method returns a new
    bucket."""

    tokens: float
    updated_at: float
    blocked_until: float | None = None

    @classmethod
    def full(cls, limits: Limits, now: float) -> Bucket:
        return cls(float(limits.burst), now)

    def refilled(self, limits: Limits, now: float) -> Bucket:
        """The bucket at ``now``: refilled since ``updated_at``, never above ``burst`` (a time
        before ``updated_at``, a block's end, changes nothing)."""
        if now <= self.updated_at:
            return self
        tokens = min(float(limits.burst), self.tokens + (now - self.updated_at) * limits.rate_s)
        return replace(self, tokens=tokens, updated_at=now)

    def take(self, limits: Limits, now: float) -> tuple[float, Bucket]:
        """The time of the next free turn, and the bucket once that turn is promised.

        A turn taken from a full bucket starts its refill :data:`ARRIVAL_S` later: the
        provider's full bucket starts refilling only when the create arrives, and a turn
        promised right after the burst must not reach it before that token is back.
        """
        bucket = self.refilled(limits, now)
        left = bucket.tokens - 1.0
        if left >= 0:
            turn = max(now, bucket.blocked_until or now)
        else:
            turn = max(now, bucket.updated_at) + (-left) / limits.rate_s
        if bucket.tokens >= limits.burst:
            bucket = replace(bucket, updated_at=max(now, bucket.updated_at) + ARRIVAL_S)
        return turn, replace(bucket, tokens=left)

    def block(self, until: float) -> Bucket:
        """No turn before ``until``; from then on one token at a time (no burst after being
        told to slow down). Turns promised before are void (their holders take new ones). A
        block that ends no later than the current one changes nothing."""
        if self.blocked_until is not None and until <= self.blocked_until:
            return self
        return Bucket(tokens=1.0, updated_at=max(until, self.updated_at), blocked_until=until)

    def given_back(self, limits: Limits, now: float) -> Bucket:
        """The bucket with one promised turn returned, unused (never above ``burst``)."""
        bucket = self.refilled(limits, now)
        return replace(bucket, tokens=min(float(limits.burst), bucket.tokens + 1.0))

    def cap(self, limits: Limits, now: float, remaining: float) -> Bucket:
        """The bucket holding at most what the provider says is ``remaining``."""
        bucket = self.refilled(limits, now)
        if bucket.tokens <= remaining:
            return bucket
        return replace(bucket, tokens=float(remaining))


@dataclass(frozen=True)
class Turn:
    """A promised turn: when, and the block it was promised under (a new block voids it)."""

    at: float
    blocked_until: datetime | None


def _epoch(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


def _datetime(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


class CreateThrottle:
    """The shared bucket in the app database (the row ``name`` of ``create_throttle``).

    Thread-safe and cheap to build; every method is one short transaction.
    """

    def __init__(
        self,
        engine: sa.Engine,
        limits: Limits | None = None,
        *,
        name: str = BUCKET,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.engine = engine
        self.limits = limits or Limits.from_settings()
        self.name = name
        self.clock = clock
        self._ensured = False

    def __repr__(self) -> str:
        return f"CreateThrottle({self.name!r}, {self.limits})"

    # ---- the row ----------------------------------------------------------------------------

    def _ensure_row(self) -> None:
        """Create the row, full, unless it exists (concurrent callers: one insert wins)."""
        if self._ensured:
            return
        values = {
            "name": self.name,
            "per_minute": self.limits.per_minute,
            "burst": self.limits.burst,
            "tokens": float(self.limits.burst),
            "updated_at": _datetime(self.clock()),
            "blocked_until": None,
        }
        dialect = sqlite if is_sqlite(self.engine) else postgresql
        statement = dialect.insert(ThrottleRow).values(**values).on_conflict_do_nothing()
        with session_scope(self.engine) as session:
            session.execute(statement)
        self._ensured = True

    def _update(self, change: Callable[[Bucket, float], tuple[Bucket | None, R]]) -> R:
        """Apply ``change`` to the locked row: it gets the bucket and the time, and returns the
        new bucket (None: leave the row as it is) and the result."""
        self._ensure_row()
        with session_scope(self.engine) as session:
            row = session.scalars(
                sa.select(ThrottleRow).where(ThrottleRow.name == self.name).with_for_update()
            ).one()
            before = Bucket(row.tokens, row.updated_at.timestamp(), _epoch(row.blocked_until))
            after, result = change(before, self.clock())
            if after is not None and after != before:
                row.tokens = after.tokens
                row.updated_at = _datetime(after.updated_at) or row.updated_at
                row.blocked_until = _datetime(after.blocked_until)
            # The configured limit is this process's; the last writer's applies to all.
            row.per_minute, row.burst = self.limits.per_minute, self.limits.burst
            return result

    def bucket(self) -> Bucket:
        """The bucket as stored (for operators and tests)."""
        self._ensure_row()
        with session_scope(self.engine) as session:
            row = session.get_one(ThrottleRow, self.name)
            return Bucket(row.tokens, row.updated_at.timestamp(), _epoch(row.blocked_until))

    # ---- turns ------------------------------------------------------------------------------

    def take(self, deadline: float | None = None) -> Turn | None:
        """Promise the next free turn, or None (promising nothing) when it would mean waiting
        past ``deadline`` (epoch seconds). A turn free at once is taken whatever the deadline:
        the deadline bounds waiting, and without a wait the throttle changes nothing."""

        def change(bucket: Bucket, now: float) -> tuple[Bucket | None, Turn | None]:
            at, after = bucket.take(self.limits, now)
            if deadline is not None and at > max(deadline, now):
                return None, None
            return after, Turn(at, _datetime(bucket.blocked_until))

        return self._update(change)

    def still_valid(self, turn: Turn) -> bool:
        """Whether no block was set since ``turn`` was promised."""
        with session_scope(self.engine) as session:
            blocked = session.scalar(
                sa.select(ThrottleRow.blocked_until).where(ThrottleRow.name == self.name)
            )
        return _epoch(blocked) == _epoch(turn.blocked_until)

    def give_back(self, turn: Turn) -> bool:
        """Return a promised turn that no create will use (its step stopped, or gave up before
        sending), in one transaction, so nobody waits behind it. A turn voided by a newer
        block is not returned: the block already took every promise back. True if returned."""

        def change(bucket: Bucket, now: float) -> tuple[Bucket | None, bool]:
            if bucket.blocked_until != _epoch(turn.blocked_until):
                return None, False
            return bucket.given_back(self.limits, now), True

        return self._update(change)

    def wait_turn(
        self,
        deadline: float | None = None,
        *,
        stop: threading.Event | None = None,
        sleep: Callable[[float], object] = time.sleep,
    ) -> Turn:
        """Wait for a turn to create; returns it (its ``at`` is never after the return).

        Raises ``GenerationError(deadline_exceeded)`` when no turn comes before ``deadline``
        (the queue deadline: the caller fails and refunds its generation; no turn is promised
        then), and :class:`Interrupted` once ``stop`` is set. A turn promised to a wait that
        ends by any exception (``Interrupted``, the run's own interruption raised in its sleep)
        is given back.
        """
        while True:
            turn = self.take(deadline)
            if turn is None:
                raise GenerationError(
                    DEADLINE_EXCEEDED,
                    "no turn to create a prediction before the queue deadline "
                    "(AI_HANDLER_QUEUE_ALLOWANCE_S): the provider's create limit is "
                    "saturated",
                )
            slept = False
            try:
                while (left := turn.at - self.clock()) > 0:
                    if stop is not None and stop.is_set():
                        raise Interrupted("stopped while waiting for a turn to create")
                    sleep(min(left, MAX_NAP_S))
                    slept = True
            except BaseException:
                # The original exception matters more than a failed return of the turn.
                with contextlib.suppress(Exception):
                    self.give_back(turn)
                raise
            # A turn had at once needs no second look; one waited for may have been voided.
            if not slept or self.still_valid(turn):
                return turn

    # ---- what the provider says -------------------------------------------------------------

    def block(self, seconds: float) -> None:
        """Hold every create back for ``seconds`` from now (a 429's ``Retry-After``)."""

        def change(bucket: Bucket, now: float) -> tuple[Bucket, None]:
            return bucket.block(now + max(0.0, seconds)), None

        self._update(change)

    def cap(self, remaining: float) -> None:
        """Never hold more than the provider's ``ratelimit-remaining``."""

        def change(bucket: Bucket, now: float) -> tuple[Bucket, None]:
            return bucket.cap(self.limits, now, remaining), None

        self._update(change)

    def observe(self, status: int, headers: Mapping[str, str]) -> None:
        """Feed the bucket with a create's answer: a 429 blocks (its ``Retry-After``, else one
        token's time), any other answer caps it at ``ratelimit-remaining``."""
        if status == 429:
            retry_after = parse_retry_after(headers.get("retry-after"))
            self.block(retry_after if retry_after is not None else 1.0 / self.limits.rate_s)
            return
        remaining = _number(headers.get("ratelimit-remaining"))
        if remaining is not None:
            self.cap(remaining)

    def pacer(self, deadline: float | None, *, stop: threading.Event | None = None) -> Pacer:
        """What ``ReplicateClient.create`` calls for one generation with this queue deadline."""
        return Pacer(self, deadline, stop)


def _number(value: str | None) -> float | None:
    try:
        number = float(value) if value is not None else None
    except ValueError:
        return None
    return number if number is not None and number >= 0 else None


@dataclass
class Pacer:
    """One generation's side of the throttle: wait for a turn before each create, report each
    answer, hand back a turn granted but not used (``replicate.client.CreatePacer``). Used by
    one thread."""

    throttle: CreateThrottle
    deadline: float | None
    stop: threading.Event | None = None
    _granted: Turn | None = field(default=None, init=False, repr=False)

    def wait_turn(self) -> None:
        self._granted = self.throttle.wait_turn(self.deadline, stop=self.stop)

    def answered(self, status: int, headers: Mapping[str, str]) -> None:
        self._granted = None  # the create was sent: its turn is spent
        self.throttle.observe(status, headers)

    def unused(self) -> None:
        turn, self._granted = self._granted, None
        if turn is not None:
            self.throttle.give_back(turn)
