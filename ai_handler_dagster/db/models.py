"""Tables of the app database: accounts, holds, ledger entries and generations.

The database enforces the money rules itself, so a bug in Python (or a hand-written SQL update)
cannot break them silently:

- ``accounts``: ``held >= 0`` and ``balance - held >= 0`` (available credits never go negative).
- ``holds``: one per idempotency key, positive amount, ``0 <= captured_amount <= amount``, and
  ``ended_at`` is set exactly when the hold is no longer pending.
- ``ledger_entries``: append-only; one per idempotency key; partial unique indexes allow a hold at
  most one ``hold`` entry and at most one ending entry (``capture``, ``release`` or ``expire``).
- ``generations``: a prediction id can belong to one generation only, so two generations can never
  adopt the same paid prediction.
- ``create_attempts``: one row per generation attempt that asked the provider for a prediction,
  kept for good; a prediction id is owned by one attempt only, ever (requeues included). It
  also keeps what the provider charged us for the attempt's prediction (migration 0006).
- ``user_priorities``: the highest priority each listed user may ask for, in the range of
  ``generations.priority`` (``MIN_PRIORITY`` to ``MAX_PRIORITY``).

Credits are integers; money the provider charges is integer nano-USD (``NanoUSD``, see
``provider_costs.py``). Timestamps are timezone-aware UTC in Python on both databases.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from ai_handler_dagster.domain import (
    ENDING_KINDS,
    MAX_PRIORITY,
    MIN_PRIORITY,
    TERMINAL,
    AttemptState,
    EntryKind,
    GenerationStatus,
    HoldStatus,
)

#: Deterministic constraint names on every database, so migrations can refer to them.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


# SQLite only autoincrements an ``INTEGER PRIMARY KEY``; PostgreSQL gets 64-bit ids.
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
# Credits are whole numbers; 64-bit leaves room for any realistic balance.
Credits = sa.BigInteger()
# The provider's charges, in whole nano-USD (10^-9 USD): exact and summable on both databases.
NanoUSD = sa.BigInteger()


def utcnow() -> datetime:
    """The current time, timezone-aware UTC (the only kind of datetime stored here)."""
    return datetime.now(UTC)


class UTCDateTime(sa.TypeDecorator[datetime]):
    """A timestamp that is always timezone-aware UTC in Python.

    PostgreSQL stores ``timestamptz``. SQLite has no time zones: values are stored as naive UTC
    text (so ``<`` comparisons in SQL stay correct) and come back tagged as UTC. Naive values
    given in Python (or in a query's bound parameters) are taken to be UTC.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        # A naive value is taken as UTC (what SQLite stores), never as the server's local time.
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def _in(column: str, values: Iterable[str]) -> str:
    return f"{column} IN ({', '.join(repr(str(v)) for v in values)})"


class Base(DeclarativeBase):
    """Declarative base sharing one MetaData (with the naming convention)."""

    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: sa.JSON()}


class Account(Base):
    """A user's credits. ``balance`` and ``held`` are caches of the ledger entries' sums."""

    __tablename__ = "accounts"
    __table_args__ = (
        sa.CheckConstraint("held >= 0", name="held_nonnegative"),
        sa.CheckConstraint("balance - held >= 0", name="available_nonnegative"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(sa.String(255), unique=True)
    balance: Mapped[int] = mapped_column(Credits, default=0, server_default="0")
    held: Mapped[int] = mapped_column(Credits, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=sa.func.now())
    updated_at: Mapped[datetime] = mapped_column(
        default=utcnow, onupdate=utcnow, server_default=sa.func.now()
    )

    @property
    def available(self) -> int:
        """Credits the user can still reserve."""
        return self.balance - self.held


class Hold(Base):
    """A reservation of credits (a TigerBeetle-style pending transfer).

    It ends exactly once: ``captured`` (part or all of it is spent, the rest returns), ``released``
    (all returns) or ``expired`` (released by the expiry sweep after ``expires_at``).
    """

    __tablename__ = "holds"
    __table_args__ = (
        sa.CheckConstraint("amount > 0", name="amount_positive"),
        sa.CheckConstraint(_in("status", HoldStatus), name="status_valid"),
        sa.CheckConstraint(
            "captured_amount >= 0 AND captured_amount <= amount", name="captured_within_amount"
        ),
        sa.CheckConstraint(
            "status = 'captured' OR captured_amount = 0", name="captured_only_when_captured"
        ),
        sa.CheckConstraint(
            "(status = 'pending' AND ended_at IS NULL)"
            " OR (status <> 'pending' AND ended_at IS NOT NULL)",
            name="ended_at_matches_status",
        ),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    account_id: Mapped[int] = mapped_column(sa.ForeignKey("accounts.id"), index=True)
    # No foreign key: the ledger does not depend on generations (generations.hold_id points here).
    generation_id: Mapped[int | None] = mapped_column(sa.BigInteger(), index=True)
    idempotency_key: Mapped[str] = mapped_column(sa.String(255), unique=True)
    amount: Mapped[int] = mapped_column(Credits)
    status: Mapped[str] = mapped_column(sa.String(16), default="pending", server_default="pending")
    captured_amount: Mapped[int] = mapped_column(Credits, default=0, server_default="0")
    expires_at: Mapped[datetime] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=sa.func.now())
    ended_at: Mapped[datetime | None] = mapped_column()


# Partial unique indexes: the database refuses a second opening or a second ending of one hold.
_ENDING_WHERE = sa.text(_in("kind", ENDING_KINDS))
_OPENING_WHERE = sa.text("kind = 'hold'")


class LedgerEntry(Base):
    """One append-only movement of credits.

    ``balance_delta`` and ``held_delta`` are what the entry did to the account: a grant adds to the
    balance, a hold adds to ``held``, a capture removes the hold and spends ``amount`` of it, a
    release or expiry removes the hold and spends nothing.
    """

    __tablename__ = "ledger_entries"
    __table_args__ = (
        sa.CheckConstraint(_in("kind", EntryKind), name="kind_valid"),
        sa.CheckConstraint("amount >= 0", name="amount_nonnegative"),
        sa.CheckConstraint("kind = 'grant' OR hold_id IS NOT NULL", name="hold_entries_have_hold"),
        sa.Index(
            "uq_ledger_entries_hold_ending",
            "hold_id",
            unique=True,
            sqlite_where=_ENDING_WHERE,
            postgresql_where=_ENDING_WHERE,
        ),
        sa.Index(
            "uq_ledger_entries_hold_opening",
            "hold_id",
            unique=True,
            sqlite_where=_OPENING_WHERE,
            postgresql_where=_OPENING_WHERE,
        ),
        # An account's statement, newest first, a page at a time (migration 0010).
        sa.Index("ix_ledger_entries_account_id_id", "account_id", "id"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    account_id: Mapped[int] = mapped_column(sa.ForeignKey("accounts.id"))
    hold_id: Mapped[int | None] = mapped_column(sa.ForeignKey("holds.id"), index=True)
    kind: Mapped[str] = mapped_column(sa.String(16))
    amount: Mapped[int] = mapped_column(Credits)
    balance_delta: Mapped[int] = mapped_column(Credits)
    held_delta: Mapped[int] = mapped_column(Credits)
    idempotency_key: Mapped[str] = mapped_column(sa.String(300), unique=True)
    # Why the entry exists (a release reason, a grant note); informational only.
    memo: Mapped[str | None] = mapped_column(sa.String(500))
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=sa.func.now())


class Generation(Base):
    """One generation request and the state of its current attempt.

    Status: ``pending -> queued -> running -> succeeded | failed | canceled``. ``requeue`` starts a
    new attempt (``attempt + 1``) from ``failed``/``canceled``; the old attempt's money is settled.
    ``prediction_model``/``prediction_version`` are what the provider answered, which is not always
    what ``model`` asked for.
    """

    __tablename__ = "generations"
    __table_args__ = (
        sa.CheckConstraint(_in("status", GenerationStatus), name="status_valid"),
        sa.CheckConstraint("attempt >= 1", name="attempt_positive"),
        sa.CheckConstraint("amount_held >= 0", name="amount_held_nonnegative"),
        sa.CheckConstraint("amount_charged >= 0", name="amount_charged_nonnegative"),
        sa.CheckConstraint(
            f"priority >= {MIN_PRIORITY} AND priority <= {MAX_PRIORITY}", name="priority_range"
        ),
        # Counting by status, and stale queued batches in id order.
        sa.Index("ix_generations_status_id", "status", "id"),
        # The claim: the top pending priority, its users one index seek each, and each user's
        # oldest rows, all read through this index with limits (generations.claim_pending).
        sa.Index(
            "ix_generations_status_priority_user_id_id", "status", "priority", "user_id", "id"
        ),
        # Aging: the pending rows that have waited longest, oldest first.
        sa.Index("ix_generations_status_pending_since_id", "status", "pending_since", "id"),
        # Reprocessing backfills select a day of requests.
        sa.Index("ix_generations_created_at", "created_at"),
        # A user's generations newest first, a page at a time (GET /v1/generations?user=).
        sa.Index("ix_generations_user_id_id", "user_id", "id"),
        # /metrics: counts by status and error code, and the generations that ended lately
        # (migration 0010).
        sa.Index("ix_generations_status_error_code", "status", "error_code"),
        sa.Index("ix_generations_finished_at", "finished_at"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    request_id: Mapped[str | None] = mapped_column(sa.String(255), unique=True)
    user_id: Mapped[str] = mapped_column(sa.String(255))
    model: Mapped[str] = mapped_column(sa.String(255))
    input: Mapped[dict[str, Any]] = mapped_column()
    status: Mapped[str] = mapped_column(sa.String(16), default="pending", server_default="pending")
    attempt: Mapped[int] = mapped_column(default=1, server_default="1")
    #: Higher is claimed first (``MIN_PRIORITY`` to ``MAX_PRIORITY``; migration 0005).
    priority: Mapped[int] = mapped_column(default=MIN_PRIORITY, server_default=str(MIN_PRIORITY))
    #: Since when the current attempt waits to be claimed (submit, insert or requeue): aging
    #: counts from here.
    pending_since: Mapped[datetime] = mapped_column(default=utcnow, server_default=sa.func.now())
    batch_key: Mapped[str | None] = mapped_column(sa.String(255), index=True)
    dagster_run_id: Mapped[str | None] = mapped_column(sa.String(64), index=True)
    prediction_id: Mapped[str | None] = mapped_column(sa.String(255), unique=True)
    prediction_model: Mapped[str | None] = mapped_column(sa.String(255))
    prediction_version: Mapped[str | None] = mapped_column(sa.String(255))
    hold_id: Mapped[int | None] = mapped_column(sa.ForeignKey("holds.id"))
    amount_held: Mapped[int] = mapped_column(Credits, default=0, server_default="0")
    amount_charged: Mapped[int] = mapped_column(Credits, default=0, server_default="0")
    #: What the provider charged for the current attempt's prediction (a mirror of its
    #: ``create_attempts.provider_cost_nusd``); None while unknown.
    provider_cost_nusd: Mapped[int | None] = mapped_column(NanoUSD)
    outputs: Mapped[list[dict[str, Any]] | None] = mapped_column(sa.JSON())
    error_code: Mapped[str | None] = mapped_column(sa.String(64))
    error_message: Mapped[str | None] = mapped_column(sa.Text())
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=sa.func.now())
    queued_at: Mapped[datetime | None] = mapped_column()
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    updated_at: Mapped[datetime] = mapped_column(
        default=utcnow, onupdate=utcnow, server_default=sa.func.now()
    )

    @property
    def is_terminal(self) -> bool:
        """True once the current attempt has ended (succeeded, failed or canceled)."""
        return self.status in TERMINAL


class CreateAttempt(Base):
    """A generation attempt's dealings with the provider's create (migration 0004).

    ``model`` is the requested reference and ``input_sha256`` the hash of the input it sent
    (``generations.input_sha256``): with ``started_at`` (its first create) they say which listed
    predictions this attempt could have made. ``answered_model`` is the model name the provider
    answered with, so a model that answers under another name (Replicate's official models) is
    recognised next time. ``how`` says whether the answer named the prediction (``created``) or
    it was found in the list after a lost answer (``adopted``).
    """

    __tablename__ = "create_attempts"
    __table_args__ = (
        sa.CheckConstraint(_in("state", AttemptState), name="state"),
        sa.CheckConstraint(
            "(state = 'owned') = (prediction_id IS NOT NULL)", name="owned_has_prediction"
        ),
        sa.CheckConstraint("how IS NULL OR how IN ('created', 'adopted')", name="how"),
        sa.CheckConstraint(
            "provider_cost_nusd IS NULL OR provider_cost_nusd >= 0", name="provider_cost"
        ),
        sa.Index("ix_create_attempts_model_input_sha256", "model", "input_sha256"),
    )

    generation_id: Mapped[int] = mapped_column(
        Id, sa.ForeignKey("generations.id"), primary_key=True
    )
    attempt: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    model: Mapped[str] = mapped_column(sa.String(255))
    input_sha256: Mapped[str] = mapped_column(sa.String(64))
    started_at: Mapped[datetime] = mapped_column(index=True)
    state: Mapped[str] = mapped_column(sa.String(16))
    state_at: Mapped[datetime] = mapped_column()
    #: When an answer of this attempt was first lost (None: never). Only such attempts, and
    #: those that never owned a prediction, can have left an orphan behind.
    lost_at: Mapped[datetime | None] = mapped_column()
    prediction_id: Mapped[str | None] = mapped_column(sa.String(255), unique=True)
    how: Mapped[str | None] = mapped_column(sa.String(16))
    answered_model: Mapped[str | None] = mapped_column(sa.String(255))
    answered_version: Mapped[str | None] = mapped_column(sa.String(255))
    #: What this attempt delivered (``generations.outputs`` of its success), kept when a
    #: regenerate starts a new attempt: the user paid for these objects.
    outputs: Mapped[list[dict[str, Any]] | None] = mapped_column(sa.JSON())
    #: What the provider charged us for this attempt's prediction, in nano-USD, from the
    #: provider's price in the price table and what the finished prediction used; None while
    #: not finished, unpriced, or lacking the measure its price needs.
    provider_cost_nusd: Mapped[int | None] = mapped_column(NanoUSD)
    #: When the ended prediction was priced (set once; with a NULL cost: unknown, or unpriced).
    provider_cost_at: Mapped[datetime | None] = mapped_column()


class UserPriority(Base):
    """The highest priority an operator allows a user (migration 0005); it is also the priority
    of the user's requests that name none. Users not listed get
    ``AI_HANDLER_DEFAULT_PRIORITY``."""

    __tablename__ = "user_priorities"
    __table_args__ = (
        sa.CheckConstraint(
            f"max_priority >= {MIN_PRIORITY} AND max_priority <= {MAX_PRIORITY}",
            name="max_priority_range",
        ),
    )

    user_id: Mapped[str] = mapped_column(sa.String(255), primary_key=True)
    max_priority: Mapped[int] = mapped_column()
    updated_at: Mapped[datetime] = mapped_column(
        default=utcnow, onupdate=utcnow, server_default=sa.func.now()
    )


# --------------------------------------------------------------------------------------------
# Webhooks (migration 0003): what Replicate told us about predictions, so waiting needs no polling.


class WebhookDelivery(Base):
    """One accepted webhook delivery, kept so a retried or replayed one is recognised.

    Replicate keeps an event's ``webhook-id`` across its retries; the primary key makes the
    database, not a check in Python, refuse to record the same event twice.
    """

    __tablename__ = "webhook_deliveries"

    webhook_id: Mapped[str] = mapped_column(sa.String(255), primary_key=True)
    prediction_id: Mapped[str] = mapped_column(sa.String(255), index=True)
    # Indexed for pruning old deliveries.
    received_at: Mapped[datetime] = mapped_column(
        default=utcnow, server_default=sa.func.now(), index=True
    )


class PredictionState(Base):
    """The latest state of a prediction as its webhooks reported it.

    ``payload`` is the prediction JSON as received. Events can arrive out of order (a retried
    ``start`` after ``completed``), so a write never moves a terminal status back to a running
    one, nor ``processing`` back to ``starting`` (see ``webhooks/store.py``).
    """

    __tablename__ = "prediction_states"

    prediction_id: Mapped[str] = mapped_column(sa.String(255), primary_key=True)
    status: Mapped[str] = mapped_column(sa.String(32))
    payload: Mapped[dict[str, Any]] = mapped_column()
    # Indexed for pruning states nobody will read again.
    updated_at: Mapped[datetime] = mapped_column(
        default=utcnow, onupdate=utcnow, server_default=sa.func.now(), index=True
    )


# --------------------------------------------------------------------------------------------
# The create throttle (migration 0007): one pace of creates for every run, process and host.


class CreateThrottle(Base):
    """The token bucket every create takes its turn from (``throttle.py``).

    At ``updated_at`` the bucket held ``tokens``; it refills at ``per_minute / 60`` a second up
    to ``burst``. Negative tokens are turns already promised to waiting creates. No create
    starts before ``blocked_until`` (the provider said slow down: a 429's ``Retry-After``); a
    turn promised before a block was set is taken again.
    """

    __tablename__ = "create_throttle"
    __table_args__ = (
        sa.CheckConstraint("per_minute > 0", name="per_minute_positive"),
        sa.CheckConstraint("burst >= 1", name="burst_positive"),
    )

    name: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    per_minute: Mapped[float] = mapped_column(sa.Float())
    burst: Mapped[int] = mapped_column()
    tokens: Mapped[float] = mapped_column(sa.Float())
    updated_at: Mapped[datetime] = mapped_column()
    blocked_until: Mapped[datetime | None] = mapped_column()


# --------------------------------------------------------------------------------------------
# The HTTP API (migration 0008): the generation event log, API keys, per-key request counts.


class GenerationEvent(Base):
    """One state change of a generation, appended in the transaction that made it.

    Written by the ORM itself (``events.py`` listens to every flush), so no transition can
    forget it; ids grow in commit order per generation, which is what a stream resumes from
    (``Last-Event-ID``). A row an application inserts straight into ``generations`` has no
    ``pending`` event: its first is ``queued``.
    """

    __tablename__ = "generation_events"
    __table_args__ = (
        sa.CheckConstraint(_in("status", GenerationStatus), name="status_valid"),
        # A generation's events in order (a stream, a status page).
        sa.Index("ix_generation_events_generation_id_id", "generation_id", "id"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    generation_id: Mapped[int] = mapped_column(Id, sa.ForeignKey("generations.id"))
    attempt: Mapped[int] = mapped_column()
    status: Mapped[str] = mapped_column(sa.String(16))
    error_code: Mapped[str | None] = mapped_column(sa.String(64))
    at: Mapped[datetime] = mapped_column(default=utcnow, server_default=sa.func.now())


class ApiKey(Base):
    """A key an application calls the HTTP API with (``api/keys.py``).

    Only a SHA-256 of the key's secret is kept: the secret is 256 random bits, so a fast hash
    cannot be brute-forced and a lookup costs microseconds (a slow password hash would cost
    every request tens of milliseconds and protect nothing more). ``key_id`` is the public part
    of the key, shown in lists and logs. A revoked key is refused from the next request on.
    """

    __tablename__ = "api_keys"
    __table_args__ = (
        sa.CheckConstraint(
            f"max_priority IS NULL OR (max_priority >= {MIN_PRIORITY} "
            f"AND max_priority <= {MAX_PRIORITY})",
            name="max_priority_range",
        ),
        sa.CheckConstraint(
            "rate_per_minute IS NULL OR rate_per_minute >= 1", name="rate_per_minute_positive"
        ),
    )

    key_id: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    secret_sha256: Mapped[str] = mapped_column(sa.String(64))
    name: Mapped[str] = mapped_column(sa.String(255))
    #: Space-separated scopes (``read``, ``submit``, ``admin``).
    scopes: Mapped[str] = mapped_column(sa.String(255))
    #: The highest priority requests made with this key may ask for (None: the user's ceiling).
    max_priority: Mapped[int | None] = mapped_column()
    #: Requests a minute this key may make (None: ``AI_HANDLER_API_RATE_PER_MIN``).
    rate_per_minute: Mapped[int | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=sa.func.now())
    revoked_at: Mapped[datetime | None] = mapped_column()


class ApiRequestCount(Base):
    """Requests one key made in one minute: the per-key rate limit, shared by every worker and
    host of the service (``api/ratelimit.py``)."""

    __tablename__ = "api_request_counts"

    key_id: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    #: The minute, as whole minutes since the epoch.
    minute: Mapped[int] = mapped_column(sa.BigInteger(), primary_key=True)
    count: Mapped[int] = mapped_column()
