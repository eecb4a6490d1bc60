"""A user's credits over HTTP: ``GET /v1/users/{user}/credits``, ``GET /v1/users/{user}/ledger``
(the statement) and ``POST /v1/users/{user}/grants`` (admin).

Money moves only in ``ledger.py``; this module reads it and calls ``ledger.grant``.

- The statement is newest first, a page at a time, behind an opaque ``cursor`` (the id of the
  last entry shown): entries are append-only, so a page never shifts when new entries arrive and
  an entry is shown on one page only. Each page is one seek on ``(account_id, id)``.
- A grant needs an ``Idempotency-Key`` header: a retried grant without one would add the
  credits twice. The key is scoped to the calling API key (the ledger entry's key is
  ``grant:api:<key id>:<Idempotency-Key>``), so two applications cannot collide, and it is kept
  for as long as the ledger (forever): the same key and body answer the first grant again
  (``Idempotent-Replayed: true``), the same key with another amount, user or reason is 409.
  Concurrent repeats meet at the ledger's unique index and one entry is written.
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Annotated

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Header, Query, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import event
from sqlalchemy.orm import Session

from ai_handler_dagster import ledger
from ai_handler_dagster.api import deps, keys
from ai_handler_dagster.api.problems import INVALID_REQUEST, Problem, problem_type
from ai_handler_dagster.db.engine import session_scope
from ai_handler_dagster.db.models import Account, Hold, LedgerEntry
from ai_handler_dagster.domain import InvalidText, check_identifier, check_text

router = APIRouter(tags=["credits"])

#: Entries on one statement page unless ``limit`` says otherwise, and the most it may ask for.
DEFAULT_PAGE = 50
MAX_PAGE = 500
#: Longest ``Idempotency-Key``: with its namespace it fits the ledger's key column.
MAX_IDEMPOTENCY_KEY = 200
#: Longest grant reason (the ledger entry's memo).
MAX_REASON = 500
_CURSOR_PREFIX = "le:"

NO_ACCOUNT = problem_type(
    "no-account",
    404,
    "The user has no account",
    "No credits were ever granted to this user, so there is no balance or statement to show. "
    "An admin key creates the account with its first grant (POST /v1/users/{user}/grants).",
)
GRANT_CONFLICT = problem_type(
    "grant-conflict",
    409,
    "The Idempotency-Key was used for another grant",
    "This API key already made a grant with this Idempotency-Key, for another user, amount or "
    "reason. A repeat with the same body answers the first grant; a new grant needs a new key. "
    "Nothing was written.",
)


class Credits(BaseModel):
    """A user's credits: ``available = balance - held``."""

    user: str
    balance: int = Field(description="credits granted minus credits spent")
    held: int = Field(description="credits reserved by generations that have not ended")
    available: int = Field(description="credits a new generation can hold")


class Entry(BaseModel):
    """One movement of credits."""

    id: int
    kind: str = Field(description="grant, hold, capture, release or expire")
    amount: int = Field(description="the entry's credits: granted, held, spent or returned")
    balance_delta: int = Field(description="what the entry did to the balance")
    held_delta: int = Field(description="what the entry did to the held credits")
    at: datetime
    idempotency_key: str = Field(
        description="the entry's key: grant:<key> for grants, hold:<key> for a hold, "
        "end:<hold id> for the entry that ended a hold"
    )
    reason: str | None = Field(description="why: a grant's reason, a release's cause")
    hold_id: int | None
    generation_id: int | None = Field(description="the generation the hold was for")


class LedgerPage(BaseModel):
    """A page of a user's statement, newest first."""

    user: str
    entries: list[Entry]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next (older) page")
    links: dict[str, str]


class GrantIn(BaseModel):
    """Credits to add to a user's balance."""

    model_config = ConfigDict(extra="forbid")

    amount: int = Field(strict=True, ge=1, le=ledger.MAX_AMOUNT, description="whole credits")
    reason: str | None = Field(
        default=None, min_length=1, max_length=MAX_REASON, description="why (on the statement)"
    )

    @field_validator("reason")
    @classmethod
    def _clean(cls, value: str | None) -> str | None:
        if value is not None:
            check_text(value, "reason")
        return value


class Grant(BaseModel):
    """A grant as the ledger recorded it; a repeat with the same key answers the same."""

    entry_id: int
    user: str
    amount: int
    reason: str | None
    idempotency_key: str = Field(description="the Idempotency-Key the grant was made with")
    created_at: datetime
    links: dict[str, str]


def _account(session: Session, user: str) -> Account:
    found = session.scalars(sa.select(Account).where(Account.user_id == user)).first()
    if found is None:
        raise Problem(NO_ACCOUNT, f"user {user!r} has no account")
    return found


def _encode_cursor(entry_id: int) -> str:
    return base64.urlsafe_b64encode(f"{_CURSOR_PREFIX}{entry_id}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        text = ""
    number = text.removeprefix(_CURSOR_PREFIX)
    # An id past a 64-bit integer is no cursor of ours (and SQLite cannot even bind it).
    if (
        not text.startswith(_CURSOR_PREFIX)
        or not number.isascii()
        or not number.isdigit()
        or not 1 <= int(number) < 2**63
    ):
        raise Problem(
            INVALID_REQUEST,
            "cursor: not a cursor this service gave out",
            errors=[{"field": "cursor", "message": "not a cursor this service gave out"}],
        )
    return int(number)


def _links(user: str) -> dict[str, str]:
    return {"credits": f"/v1/users/{user}/credits", "ledger": f"/v1/users/{user}/ledger"}


def page_query(
    account_id: int, before: int | None, limit: int
) -> sa.Select[LedgerEntry, int | None]:
    """Up to ``limit`` of the account's entries older than ``before``, newest first, each with
    its hold's generation: one backward range scan of ``(account_id, id)``."""
    query = (
        sa.select(LedgerEntry, Hold.generation_id)
        .outerjoin(Hold, Hold.id == LedgerEntry.hold_id)
        .where(LedgerEntry.account_id == account_id)
        .order_by(LedgerEntry.id.desc())
        .limit(limit)
    )
    if before is not None:
        query = query.where(LedgerEntry.id < before)
    return query


@router.get(
    "/v1/users/{user}/credits",
    summary="A user's balance, held and available credits",
    responses={404: {"description": "the user has no account"}},
)
def credits(
    user: str,
    engine: sa.Engine = Depends(deps.engine),  # noqa: B008
    reader: deps.Reader = Depends(deps.reader),  # noqa: B008
) -> Credits:
    reader.check_user(user)
    with session_scope(engine) as session:
        account = _account(session, user)
        return Credits(
            user=user, balance=account.balance, held=account.held, available=account.available
        )


@router.get(
    "/v1/users/{user}/ledger",
    summary="A user's statement: grants, holds, captures, releases, expiries; newest first",
    responses={404: {"description": "the user has no account"}},
)
def statement(
    user: str,
    cursor: Annotated[str | None, Query(max_length=100)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = DEFAULT_PAGE,
    engine: sa.Engine = Depends(deps.engine),  # noqa: B008
    reader: deps.Reader = Depends(deps.reader),  # noqa: B008
) -> LedgerPage:
    reader.check_user(user)
    before = _decode_cursor(cursor) if cursor is not None else None
    with session_scope(engine) as session:
        account = _account(session, user)
        rows = session.execute(page_query(account.id, before, limit + 1)).all()
    page = rows[:limit]
    entries = [
        Entry(
            id=e.id,
            kind=e.kind,
            amount=e.amount,
            balance_delta=e.balance_delta,
            held_delta=e.held_delta,
            at=e.created_at,
            idempotency_key=e.idempotency_key,
            reason=e.memo,
            hold_id=e.hold_id,
            generation_id=generation_id,
        )
        for e, generation_id in page
    ]
    next_cursor = _encode_cursor(entries[-1].id) if len(rows) > limit else None
    links = _links(user)
    if next_cursor is not None:
        links["next"] = f"/v1/users/{user}/ledger?cursor={next_cursor}&limit={limit}"
    return LedgerPage(user=user, entries=entries, next_cursor=next_cursor, links=links)


def _invalid(field: str, message: str) -> Problem:
    return Problem(
        INVALID_REQUEST, f"{field}: {message}", errors=[{"field": field, "message": message}]
    )


@router.post(
    "/v1/users/{user}/grants",
    status_code=201,
    summary="Add credits to a user's balance (creates the account); idempotent by key",
    responses={409: {"description": "the Idempotency-Key was used for another grant"}},
)
def grant(
    user: str,
    body: GrantIn,
    response: Response,
    idempotency_key: Annotated[
        str,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=MAX_IDEMPOTENCY_KEY,
            description="required: a repeat with the same key and body answers the first grant",
        ),
    ],
    engine: sa.Engine = Depends(deps.engine),  # noqa: B008
    caller: keys.Caller = Depends(deps.require(keys.ADMIN)),  # noqa: B008
) -> Grant:
    try:
        check_identifier(user, "user")
    except InvalidText as exc:
        raise _invalid("user", str(exc)) from None
    try:
        check_identifier(idempotency_key, "Idempotency-Key")
    except InvalidText as exc:
        raise _invalid("header.Idempotency-Key", str(exc)) from None
    scoped = f"api:{caller.key_id}:{idempotency_key}"
    with session_scope(engine) as session:
        created: list[object] = []
        event.listen(session, "pending_to_persistent", lambda _s, obj: created.append(obj))
        try:
            entry = ledger.grant(session, user, body.amount, scoped, memo=body.reason)
        except ledger.IdempotencyConflict:
            raise Problem(
                GRANT_CONFLICT,
                f"Idempotency-Key {idempotency_key!r} was used for another grant",
            ) from None
        if entry.memo != body.reason:
            # The ledger compares user and amount; the reason is part of the body too.
            raise Problem(
                GRANT_CONFLICT,
                f"Idempotency-Key {idempotency_key!r} was used for a grant with another reason",
            )
        answer = Grant(
            entry_id=entry.id,
            user=user,
            amount=entry.amount,
            reason=entry.memo,
            idempotency_key=idempotency_key,
            created_at=entry.created_at,
            links=_links(user),
        )
    if entry not in created:
        response.headers["Idempotent-Replayed"] = "true"
    return answer
