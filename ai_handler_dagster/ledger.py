"""The credit ledger: every movement of credits in the project happens in this file.

The model is TigerBeetle's two-phase transfer. ``grant`` adds credits to a balance. ``hold``
reserves credits for one generation attempt (a pending transfer with a timeout). The hold then ends
exactly once: ``capture`` spends part or all of it (the rest returns to the available balance),
``release`` returns all of it, and ``expire`` releases holds whose deadline passed.

Rules every function follows:

- It runs inside the caller's transaction (a ``Session``), so a generation's status change and its
  ledger entry commit together or not at all. Nothing here commits.
- It locks the rows it changes (``SELECT ... FOR UPDATE`` on PostgreSQL; SQLite transactions are
  serialized by ``BEGIN IMMEDIATE``, see ``db/engine.py``). Lock order is always
  hold -> account, so two transactions never wait on each other in a cycle.
- It appends a ``ledger_entries`` row and updates the cached ``accounts.balance``/``held`` in the
  same flush. ``verify`` proves the caches still equal the sums of the entries.
- Idempotency comes from unique constraints, not from in-memory checks: repeating a call with the
  same key returns the first result; the same key with different terms raises
  ``IdempotencyConflict``. A concurrent duplicate loses at the unique index inside a SAVEPOINT and
  then returns the winner's row.

Idempotency keys of entries are namespaced so callers' keys never collide with derived ones:
``grant:<key>`` for grants, ``hold:<key>`` for a hold's opening entry and ``end:<hold id>`` for the
one entry that ends a hold.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ai_handler_dagster.db.engine import is_sqlite
from ai_handler_dagster.db.models import Account, Hold, LedgerEntry, utcnow
from ai_handler_dagster.domain import ENDING_KINDS, EntryKind, HoldStatus, check_identifier
from ai_handler_dagster.errors import AiHandlerError

__all__ = [
    "DEFAULT_HOLD_TTL",
    "HOLD_WRITES",
    "MAX_AMOUNT",
    "Balance",
    "Ending",
    "HoldAlreadyEnded",
    "IdempotencyConflict",
    "InsufficientCredits",
    "InvalidAmount",
    "LedgerError",
    "LockedAccount",
    "UnknownAccount",
    "UnknownHold",
    "Violation",
    "balance",
    "capture",
    "check_amount",
    "expire",
    "extend",
    "forget_account",
    "grant",
    "hold",
    "hold_params",
    "lock_account",
    "next_id",
    "place_hold",
    "release",
    "release_if_pending",
    "verify",
]

#: How long a hold stays pending before the expiry sweep may release it.
DEFAULT_HOLD_TTL = timedelta(hours=2)
#: Largest single amount accepted: far above any real grant, far below 64-bit overflow.
MAX_AMOUNT = 10**15

_ENDING_STATUS: dict[str, HoldStatus] = {
    EntryKind.CAPTURE: HoldStatus.CAPTURED,
    EntryKind.RELEASE: HoldStatus.RELEASED,
    EntryKind.EXPIRE: HoldStatus.EXPIRED,
}

T = TypeVar("T")


class LedgerError(AiHandlerError):
    """Base class of every error the ledger raises on purpose."""


class InvalidAmount(LedgerError, ValueError):
    """An amount that is not a positive whole number of credits within limits."""


class UnknownAccount(LedgerError, LookupError):
    """The user has no account (no credits were ever granted)."""

    def __init__(self, user_id: str) -> None:
        super().__init__(f"unknown user {user_id!r}: no credits were ever granted to this user")
        self.user_id = user_id


class UnknownHold(LedgerError, LookupError):
    """No hold has this id."""

    def __init__(self, hold_id: int) -> None:
        super().__init__(f"unknown hold {hold_id}")
        self.hold_id = hold_id


class InsufficientCredits(LedgerError):
    """The user's available credits do not cover the amount to hold."""

    def __init__(self, user_id: str, available: int, needed: int) -> None:
        super().__init__(
            f"insufficient credits for user {user_id!r}: {available} available, {needed} needed"
        )
        self.user_id = user_id
        self.available = available
        self.needed = needed


class IdempotencyConflict(LedgerError):
    """An idempotency key was reused for a different operation (other amount or account)."""


@dataclass(frozen=True)
class Ending:
    """How a hold ended: a snapshot of its ending entry, safe to use after a rollback."""

    entry_id: int
    kind: str
    amount: int

    @classmethod
    def of(cls, entry: LedgerEntry) -> Ending:
        """Snapshot ``entry`` (an ending entry: capture, release or expire)."""
        return cls(entry_id=entry.id, kind=entry.kind, amount=entry.amount)


class HoldAlreadyEnded(LedgerError):
    """The hold already ended the other way (captured vs released/expired).

    ``ending`` describes the entry that won; ``status`` is the hold's final status. Both are plain
    values: the caller's transaction is usually rolled back by the time they are read.
    """

    def __init__(self, hold: Hold, ending: LedgerEntry) -> None:
        super().__init__(
            f"hold {hold.id} already ended: {hold.status} "
            f"({ending.kind} of {ending.amount} credits, entry {ending.id})"
        )
        self.hold_id = hold.id
        self.status = hold.status
        self.ending = Ending.of(ending)


@dataclass(frozen=True)
class Balance:
    """A user's credits: ``available = balance - held``."""

    balance: int
    held: int
    available: int


@dataclass(frozen=True)
class Violation:
    """One broken ledger invariant: which account/hold/entry, and what is wrong."""

    subject: str
    message: str
    account_id: int | None = None
    hold_id: int | None = None

    def __str__(self) -> str:
        return f"{self.subject}: {self.message}"


# --- validation -------------------------------------------------------------------------------


def check_amount(amount: object, *, allow_zero: bool = False) -> int:
    # bool is an int subclass; True credits is always a bug in the caller.
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise InvalidAmount(f"amount must be a whole number of credits, got {amount!r}")
    low = 0 if allow_zero else 1
    if amount < low or amount > MAX_AMOUNT:
        raise InvalidAmount(f"amount must be between {low} and {MAX_AMOUNT} credits, got {amount}")
    return amount


# --- row access and locking -------------------------------------------------------------------


def _locked(statement: sa.Select[T]) -> sa.Select[T]:
    # FOR UPDATE is ignored by SQLite, whose transactions are already serialized. populate_existing
    # makes the ORM overwrite a stale copy already in the session with the row just locked.
    return statement.with_for_update().execution_options(populate_existing=True)


def _lock_account_of_user(session: Session, user_id: str) -> Account | None:
    return session.scalars(_locked(sa.select(Account).where(Account.user_id == user_id))).first()


def _lock_account(session: Session, account_id: int) -> Account:
    return session.scalars(_locked(sa.select(Account).where(Account.id == account_id))).one()


def _lock_hold(session: Session, hold_id: int) -> Hold:
    found = session.scalars(_locked(sa.select(Hold).where(Hold.id == hold_id))).first()
    if found is None:
        raise UnknownHold(hold_id)
    return found


def _entry_by_key(session: Session, key: str) -> LedgerEntry | None:
    return session.scalars(sa.select(LedgerEntry).where(LedgerEntry.idempotency_key == key)).first()


def _hold_by_key(session: Session, key: str) -> Hold | None:
    return session.scalars(
        sa.select(Hold).where(Hold.idempotency_key == key).execution_options(populate_existing=True)
    ).first()


def _ending_of(session: Session, hold: Hold) -> LedgerEntry:
    ending = session.scalars(
        sa.select(LedgerEntry).where(
            LedgerEntry.hold_id == hold.id, LedgerEntry.kind.in_(ENDING_KINDS)
        )
    ).first()
    if ending is None:
        # Only a hand-edited database gets here; `ai-handler ledger verify` reports it too.
        raise LedgerError(f"hold {hold.id} is {hold.status} but has no ending entry")
    return ending


def _user_of(session: Session, account_id: int) -> str:
    return session.get_one(Account, account_id).user_id


def _insert_once(session: Session, row: Account | Hold | LedgerEntry) -> IntegrityError | None:
    """Insert ``row`` in a SAVEPOINT; the constraint error if the database refused it.

    The savepoint keeps the caller's transaction usable after the error (PostgreSQL aborts the
    whole transaction otherwise), so the caller can read the row that won a concurrent race.
    """
    try:
        with session.begin_nested():
            session.add(row)
            session.flush()
    except IntegrityError as exc:
        return exc
    return None


def _account_for_grant(session: Session, user_id: str) -> Account:
    account = _lock_account_of_user(session, user_id)
    if account is not None:
        return account
    created = Account(user_id=user_id, balance=0, held=0)
    error = _insert_once(session, created)
    if error is None:
        # Our uncommitted row: concurrent creators of the same user wait on its unique index.
        return created
    account = _lock_account_of_user(session, user_id)
    if account is None:
        raise error
    return account


# --- the hot path, in Core ---------------------------------------------------------------------
#
# Placing a hold is what every submit does, so its writes are Core statements built once, with
# ids allocated up front (``next_id``) so that none waits for another's RETURNING: ``place_hold``
# runs them one by one, and ``generations.submission`` sends them with its own as one statement
# on PostgreSQL. The ORM's unit of work would cost several times the statements themselves.


def next_id(model: type[Any], dialect: str) -> sa.ColumnElement[int]:
    """An expression that allocates the next id of ``model``'s table in the caller's
    transaction: the id column's sequence on PostgreSQL; on SQLite, whose writers hold the
    database's lock from ``BEGIN IMMEDIATE`` on, one past the largest id (what SQLite itself
    would assign)."""
    if dialect == "sqlite":
        return sa.select(sa.func.coalesce(sa.func.max(model.id), 0) + 1).scalar_subquery()
    return sa.func.nextval(sa.func.pg_get_serial_sequence(model.__tablename__, "id"))


def _param(name: str, column: Any) -> sa.BindParameter[Any]:
    return sa.bindparam(name, type_=column.type)


#: A new hold's writes, in order: the hold, its opening entry, the account's ``held``. Their
#: parameters (``hold_params``) are named apart from any column so they can share one statement.
HOLD_WRITES: tuple[sa.Executable, ...] = (
    sa.insert(Hold).values(
        id=_param("hold_id_", Hold.id),
        account_id=_param("hold_account_", Hold.account_id),
        generation_id=_param("hold_generation_", Hold.generation_id),
        idempotency_key=_param("hold_key_", Hold.idempotency_key),
        amount=_param("hold_amount_", Hold.amount),
        status=HoldStatus.PENDING,
        captured_amount=0,
        expires_at=_param("hold_expires_", Hold.expires_at),
        created_at=_param("hold_at_", Hold.created_at),
    ),
    sa.insert(LedgerEntry).values(
        account_id=_param("hold_account_", LedgerEntry.account_id),
        hold_id=_param("hold_id_", LedgerEntry.hold_id),
        kind=EntryKind.HOLD,
        amount=_param("hold_amount_", LedgerEntry.amount),
        balance_delta=0,
        held_delta=_param("hold_amount_", LedgerEntry.held_delta),
        idempotency_key=_param("hold_entry_key_", LedgerEntry.idempotency_key),
        created_at=_param("hold_at_", LedgerEntry.created_at),
    ),
    sa.update(Account)
    .where(Account.id == _param("hold_account_", Account.id))
    .values(
        held=Account.held + _param("hold_amount_", Account.held),
        updated_at=_param("hold_at_", Account.updated_at),
    ),
)


@dataclass(frozen=True)
class LockedAccount:
    """A user's account row, locked by the caller's transaction until it ends."""

    id: int
    user_id: str
    balance: int
    held: int

    @property
    def available(self) -> int:
        return self.balance - self.held


def hold_params(
    account: LockedAccount,
    hold_id: int,
    amount: int,
    key: str,
    *,
    generation_id: int | None,
    expires_at: datetime,
    now: datetime,
) -> dict[str, Any]:
    """The parameters of ``HOLD_WRITES`` for a hold of ``amount`` on a locked ``account`` that
    affords it (the caller checked what ``hold`` checks)."""
    check_amount(amount)
    return {
        "hold_id_": hold_id,
        "hold_account_": account.id,
        "hold_generation_": generation_id,
        "hold_key_": key,
        "hold_amount_": amount,
        "hold_expires_": expires_at,
        "hold_at_": now,
        "hold_entry_key_": f"hold:{key}",
    }


def forget_account(session: Session, account_id: int) -> None:
    """Expire the session's copy of the account, if it holds one, after a Core write to it."""
    cached = session.identity_map.get(_ACCOUNT.identity_key_from_primary_key((account_id,)))
    if cached is not None:
        session.expire(cached)


_ACCOUNT = sa.inspect(Account)
_LOCK_ACCOUNT_ROW = (
    sa.select(Account.id, Account.balance, Account.held)
    .where(Account.user_id == sa.bindparam("user_id"))
    .with_for_update()
)
_NEXT_HOLD_ID = {d: sa.select(next_id(Hold, d)) for d in ("postgresql", "sqlite")}


def lock_account(session: Session, user_id: str) -> LockedAccount | None:
    """Lock ``user_id``'s account for the rest of the transaction (None if there is none)."""
    session.flush()  # as a query through the session would (autoflush)
    row = session.connection().execute(_LOCK_ACCOUNT_ROW, {"user_id": user_id}).first()
    return None if row is None else LockedAccount(row.id, user_id, row.balance, row.held)


def place_hold(
    session: Session,
    account: LockedAccount,
    amount: int,
    key: str,
    *,
    generation_id: int | None,
    expires_at: datetime,
    now: datetime,
) -> int:
    """Open a hold of ``amount`` on a locked ``account`` that affords it; returns its id. A
    ``key`` used before fails at its unique index (``IntegrityError``), so a caller that cannot
    rule that out runs this in a SAVEPOINT."""
    connection = session.connection()
    dialect = "sqlite" if is_sqlite(session) else "postgresql"
    hold_id = int(connection.execute(_NEXT_HOLD_ID[dialect]).scalar_one())
    params = hold_params(
        account, hold_id, amount, key, generation_id=generation_id, expires_at=expires_at, now=now
    )
    for statement in HOLD_WRITES:
        connection.execute(statement, params)
    forget_account(session, account.id)
    return hold_id


# --- money movements --------------------------------------------------------------------------


def grant(
    session: Session, user_id: str, amount: int, key: str, *, memo: str | None = None
) -> LedgerEntry:
    """Add ``amount`` credits to ``user_id``'s balance (creating the account if needed).

    Idempotent by ``key``: a repeat returns the first entry; the same key for a different user or
    amount raises ``IdempotencyConflict``.
    """
    check_identifier(user_id, "user id")
    check_amount(amount)
    check_identifier(key, "idempotency key")
    entry_key = f"grant:{key}"

    def same_or_conflict(existing: LedgerEntry) -> LedgerEntry:
        owner = _user_of(session, existing.account_id)
        if owner != user_id or existing.amount != amount:
            raise IdempotencyConflict(
                f"grant key {key!r} was already used for {existing.amount} credits to user "
                f"{owner!r}; refusing to reuse it for {amount} credits to user {user_id!r}"
            )
        return existing

    existing = _entry_by_key(session, entry_key)
    if existing is not None:
        return same_or_conflict(existing)
    account = _account_for_grant(session, user_id)
    entry = LedgerEntry(
        account_id=account.id,
        kind=EntryKind.GRANT,
        amount=amount,
        balance_delta=amount,
        held_delta=0,
        idempotency_key=entry_key,
        memo=memo,
    )
    error = _insert_once(session, entry)
    if error is not None:
        winner = _entry_by_key(session, entry_key)
        if winner is None:
            raise error
        return same_or_conflict(winner)
    account.balance += amount
    session.flush()
    return entry


def hold(
    session: Session,
    user_id: str,
    amount: int,
    key: str,
    *,
    generation_id: int | None = None,
    ttl: timedelta = DEFAULT_HOLD_TTL,
    now: datetime | None = None,
) -> Hold:
    """Reserve ``amount`` of ``user_id``'s available credits until captured, released or expired.

    Raises ``UnknownAccount``, ``InsufficientCredits`` (available vs needed) or, when ``key`` was
    used for a different hold, ``IdempotencyConflict``. A repeat with the same key returns the
    existing hold, even if it has ended since or the credits are now spent elsewhere.
    """
    check_identifier(user_id, "user id")
    check_amount(amount)
    check_identifier(key, "idempotency key")
    if ttl <= timedelta(0):
        raise ValueError(f"hold ttl must be positive, got {ttl}")

    def same_or_conflict(existing: Hold) -> Hold:
        owner = _user_of(session, existing.account_id)
        if (
            owner != user_id
            or existing.amount != amount
            or (generation_id is not None and existing.generation_id != generation_id)
        ):
            raise IdempotencyConflict(
                f"hold key {key!r} was already used for {existing.amount} credits of user "
                f"{owner!r} (generation {existing.generation_id}); refusing to reuse it for "
                f"{amount} credits of user {user_id!r} (generation {generation_id})"
            )
        return existing

    account = lock_account(session, user_id)
    if account is None:
        raise UnknownAccount(user_id)
    # Checked after taking the account lock: a concurrent duplicate that got the lock first has
    # committed by now, and the repeat must return its hold rather than fail for lack of funds.
    existing = _hold_by_key(session, key)
    if existing is not None:
        return same_or_conflict(existing)
    if account.available < amount:
        raise InsufficientCredits(user_id, account.available, amount)

    now = now or utcnow()
    try:
        # A SAVEPOINT: the same key on another account (the two calls did not share a lock) fails
        # at the unique index and leaves the caller's transaction usable.
        with session.begin_nested():
            hold_id = place_hold(
                session,
                account,
                amount,
                key,
                generation_id=generation_id,
                expires_at=now + ttl,
                now=now,
            )
    except IntegrityError:
        winner = _hold_by_key(session, key)
        if winner is None:
            raise
        return same_or_conflict(winner)
    # Read, not taken from the identity map: on SQLite a rolled-back hold's id is reused, and
    # the session may still hold that hold's object (regression: hold returned another hold).
    return session.get_one(Hold, hold_id, populate_existing=True)


def _end(
    session: Session, locked_hold: Hold, kind: str, spent: int, memo: str | None, now: datetime
) -> LedgerEntry:
    """End a pending, locked hold: one entry, the hold's new status and the account's caches."""
    account = _lock_account(session, locked_hold.account_id)
    entry = LedgerEntry(
        account_id=account.id,
        hold_id=locked_hold.id,
        kind=kind,
        amount=spent if kind == EntryKind.CAPTURE else locked_hold.amount,
        balance_delta=-spent,
        held_delta=-locked_hold.amount,
        idempotency_key=f"end:{locked_hold.id}",
        memo=memo[:500] if memo else None,
    )
    session.add(entry)
    locked_hold.status = _ENDING_STATUS[kind]
    locked_hold.captured_amount = spent
    locked_hold.ended_at = now
    account.held -= locked_hold.amount
    account.balance -= spent
    session.flush()
    return entry


def capture(
    session: Session, hold_id: int, amount: int, *, now: datetime | None = None
) -> LedgerEntry:
    """Spend ``amount`` (0 <= amount <= held amount) of a pending hold; the rest is released.

    A repeat returns the first capture entry (a different amount raises
    ``IdempotencyConflict``); after a release or expiry it raises ``HoldAlreadyEnded``.
    Capturing is allowed until the hold has actually been expired by ``expire``.
    """
    check_amount(amount, allow_zero=True)
    locked = _lock_hold(session, hold_id)
    if locked.status != HoldStatus.PENDING:
        ending = _ending_of(session, locked)
        if ending.kind != EntryKind.CAPTURE:
            raise HoldAlreadyEnded(locked, ending)
        if ending.amount != amount:
            raise IdempotencyConflict(
                f"hold {hold_id} was already captured for {ending.amount} credits; "
                f"refusing a second capture for {amount}"
            )
        return ending
    if amount > locked.amount:
        raise InvalidAmount(
            f"cannot capture {amount} credits from hold {hold_id} of {locked.amount}"
        )
    return _end(session, locked, EntryKind.CAPTURE, amount, None, now or utcnow())


def release(
    session: Session, hold_id: int, reason: str, *, now: datetime | None = None
) -> LedgerEntry:
    """Return all of a pending hold to the available balance.

    A repeat (or a release after the hold expired) returns the entry that released it; after a
    capture it raises ``HoldAlreadyEnded``.
    """
    locked = _lock_hold(session, hold_id)
    if locked.status != HoldStatus.PENDING:
        ending = _ending_of(session, locked)
        if ending.kind == EntryKind.CAPTURE:
            raise HoldAlreadyEnded(locked, ending)
        return ending
    return _end(session, locked, EntryKind.RELEASE, 0, reason, now or utcnow())


def release_if_pending(
    session: Session, hold_id: int, reason: str, *, now: datetime | None = None
) -> bool:
    """Release the hold if it is still pending; False if it already ended (any way).

    This is what every refund path calls (the failure hook, the run-failure sensor,
    reconciliation): they may all fire for one generation and exactly one refund happens, because
    the hold row is locked and its status checked under the lock.
    """
    locked = _lock_hold(session, hold_id)
    if locked.status != HoldStatus.PENDING:
        return False
    _end(session, locked, EntryKind.RELEASE, 0, reason, now or utcnow())
    return True


def extend(session: Session, hold_id: int, until: datetime) -> Hold:
    """Make a pending hold last at least ``until`` (never shorter); no credits move. A hold
    placed at submit is extended when its run starts, to the run's own lifetime."""
    locked = _lock_hold(session, hold_id)
    if locked.status == HoldStatus.PENDING and locked.expires_at < until:
        locked.expires_at = until
        session.flush()
    return locked


def expire(session: Session, now: datetime | None = None, *, limit: int = 1000) -> list[Hold]:
    """Release every pending hold whose ``expires_at`` has passed (at most ``limit`` per call).

    Holds locked by a concurrent transaction (being captured or released right now) are skipped on
    PostgreSQL rather than waited for; the next sweep sees them if they are still pending.
    """
    now = now or utcnow()
    due = session.scalars(
        sa.select(Hold)
        .where(Hold.status == HoldStatus.PENDING, Hold.expires_at <= now)
        .order_by(Hold.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .execution_options(populate_existing=True)
    ).all()
    if due:
        # Their accounts locked in id order, as every transaction that locks several does (a
        # batch of submits: generations.submissions), so that none waits on another in a cycle.
        session.execute(
            sa.select(Account.id)
            .where(Account.id.in_(sorted({item.account_id for item in due})))
            .order_by(Account.id)
            .with_for_update()
        )
    for item in due:
        _end(session, item, EntryKind.EXPIRE, 0, "expired", now)
    return list(due)


def balance(session: Session, user_id: str) -> Balance:
    """The user's balance, held and available credits; ``UnknownAccount`` if there is none."""
    account = session.scalars(sa.select(Account).where(Account.user_id == user_id)).first()
    if account is None:
        raise UnknownAccount(user_id)
    return Balance(balance=account.balance, held=account.held, available=account.available)


# --- verification -----------------------------------------------------------------------------


def verify(session: Session) -> list[Violation]:
    """Check every ledger invariant; an empty list means the ledger is consistent.

    - each account's cached ``balance`` equals the sum of its entries' ``balance_delta``;
    - its cached ``held`` equals the sum of its pending holds and the sum of ``held_delta``;
    - no account has negative available credits (or negative held);
    - every hold has exactly one ``hold`` entry and at most one ending entry, both matching the
      hold's amount and account, and the hold's status agrees with its ending;
    - every grant entry adds exactly its amount to the balance and nothing to ``held``.
    """
    return [*_verify_accounts(session), *_verify_holds(session), *_verify_grants(session)]


def _verify_accounts(session: Session) -> Iterator[Violation]:
    sums = (
        sa.select(
            LedgerEntry.account_id,
            sa.func.sum(LedgerEntry.balance_delta).label("balance"),
            sa.func.sum(LedgerEntry.held_delta).label("held"),
        )
        .group_by(LedgerEntry.account_id)
        .subquery()
    )
    open_holds = (
        sa.select(Hold.account_id, sa.func.sum(Hold.amount).label("held"))
        .where(Hold.status == HoldStatus.PENDING)
        .group_by(Hold.account_id)
        .subquery()
    )
    rows = session.execute(
        sa.select(
            Account.id,
            Account.user_id,
            Account.balance,
            Account.held,
            sa.func.coalesce(sums.c.balance, 0),
            sa.func.coalesce(sums.c.held, 0),
            sa.func.coalesce(open_holds.c.held, 0),
        )
        .outerjoin(sums, sums.c.account_id == Account.id)
        .outerjoin(open_holds, open_holds.c.account_id == Account.id)
        .order_by(Account.id)
    )
    for (
        account_id,
        user_id,
        cached_balance,
        cached_held,
        entry_balance,
        entry_held,
        open_held,
    ) in rows:
        subject = f"account {account_id} (user {user_id!r})"

        def violation(
            message: str, account_id: int = account_id, subject: str = subject
        ) -> Violation:
            return Violation(subject, message, account_id=account_id)

        if cached_balance != entry_balance:
            yield violation(
                f"cached balance {cached_balance} != {entry_balance}, the sum of its ledger entries"
            )
        if cached_held != entry_held:
            yield violation(
                f"cached held {cached_held} != {entry_held}, the sum of its entries' held deltas"
            )
        if cached_held != open_held:
            yield violation(
                f"cached held {cached_held} != {open_held}, the sum of its pending holds"
            )
        if cached_held < 0:
            yield violation(f"held is negative ({cached_held})")
        if cached_balance - cached_held < 0:
            yield violation(
                f"available credits are negative ({cached_balance} - {cached_held} held)"
            )


def _verify_holds(session: Session) -> Iterator[Violation]:
    e = LedgerEntry
    is_opening = e.kind == EntryKind.HOLD
    is_ending = e.kind.in_(ENDING_KINDS)
    # One row per hold, with its entries summarized, so the check streams over any table size.
    bad_opening = sa.or_(
        e.amount != Hold.amount,
        e.held_delta != Hold.amount,
        e.balance_delta != 0,
        e.account_id != Hold.account_id,
    )
    bad_ending = sa.or_(
        e.held_delta != -Hold.amount,
        e.account_id != Hold.account_id,
        sa.and_(
            e.kind == EntryKind.CAPTURE,
            sa.or_(e.amount != Hold.captured_amount, e.balance_delta != -Hold.captured_amount),
        ),
        sa.and_(e.kind != EntryKind.CAPTURE, sa.or_(e.amount != Hold.amount, e.balance_delta != 0)),
    )

    def count(condition: sa.ColumnElement[bool]) -> sa.ColumnElement[int]:
        return sa.func.coalesce(sa.func.sum(sa.case((condition, 1), else_=0)), 0)

    rows = session.execute(
        sa.select(
            Hold.id,
            Hold.account_id,
            Hold.status,
            count(is_opening),
            count(sa.and_(is_opening, bad_opening)),
            count(is_ending),
            count(sa.and_(is_ending, bad_ending)),
            sa.func.max(sa.case((is_ending, e.kind), else_=None)),
        )
        .outerjoin(e, e.hold_id == Hold.id)
        .group_by(Hold.id, Hold.account_id, Hold.status)
        .order_by(Hold.id)
        .execution_options(yield_per=1000)
    )
    for hold_id, account_id, status, openings, bad_openings, endings, bad_endings, ending in rows:

        def violation(
            message: str, hold_id: int = hold_id, account_id: int = account_id
        ) -> Violation:
            return Violation(f"hold {hold_id}", message, account_id=account_id, hold_id=hold_id)

        if openings != 1:
            yield violation(f"has {openings} 'hold' entries, expected exactly 1")
        if bad_openings:
            yield violation("its 'hold' entry does not match the hold's amount or account")
        if endings > 1:
            yield violation(f"has {endings} ending entries, expected at most 1")
        if bad_endings:
            yield violation("its ending entry does not match the hold's amounts or account")
        if status == HoldStatus.PENDING and endings:
            yield violation(f"is pending but has an ending entry ({ending})")
        if status != HoldStatus.PENDING and _ENDING_STATUS.get(ending or "") != status:
            yield violation(f"is {status} but its ending entry is {ending or 'missing'}")


def _verify_grants(session: Session) -> Iterator[Violation]:
    e = LedgerEntry
    rows = session.execute(
        sa.select(e.id, e.account_id).where(
            e.kind == EntryKind.GRANT,
            sa.or_(
                e.hold_id.is_not(None),
                e.amount <= 0,
                e.balance_delta != e.amount,
                e.held_delta != 0,
            ),
        )
    )
    for entry_id, account_id in rows:
        yield Violation(
            f"entry {entry_id}",
            "grant entry must add its positive amount to the balance and nothing else",
            account_id=account_id,
        )
