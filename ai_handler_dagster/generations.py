"""State transitions of a generation, each with its money movement in the same transaction.

::

    pending --claim_pending--> queued --start_attempt--> running --succeed--> succeeded
       |                          |                         |
       +-----------------cancel---+---------fail------------+--> failed | canceled
                                                                    |
                            pending (attempt + 1) <---requeue-------+

Every function takes the caller's ``Session`` and does its work inside the caller's transaction:
the generation row is locked first (then its hold, then the account: the ledger's lock order), the
status changes, and the ledger entry that goes with it (hold, capture or release) is written in
the same commit. So a generation is never ``succeeded`` without its capture, nor ``failed`` with
its credits still held.

Retries are safe: ``start_attempt`` on a running attempt returns it (one hold per attempt, keyed
``gen:{id}:a{attempt}:hold``); ``succeed`` on a succeeded row returns it; ``fail`` on a terminal row
does nothing and returns False, so the failure hook, the run-failure sensor and reconciliation may
all fire for one generation and exactly one refund happens. ``cancel`` (an application's
request) is the same ending under the same lock, so it races each of them to one ending too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, defer, make_transient_to_detached

from ai_handler_dagster import events, ledger, lifetimes, priorities
from ai_handler_dagster.db.engine import is_sqlite
from ai_handler_dagster.db.models import (
    Account,
    CreateAttempt,
    Generation,
    GenerationEvent,
    Hold,
    LedgerEntry,
    PredictionState,
    UserPriority,
    utcnow,
)
from ai_handler_dagster.domain import (
    IN_FLIGHT,
    MAX_PRIORITY,
    MIN_PRIORITY,
    TERMINAL,
    UNSUCCESSFUL,
    AttemptState,
    EntryKind,
    GenerationStatus,
    HoldStatus,
    InvalidModelRef,
    PredictionStatus,
    check_identifier,
    check_text,
    parse_model_ref,
)
from ai_handler_dagster.errors import (
    CANCELED_BY_REQUEST,
    DEADLINE_EXCEEDED,
    INSUFFICIENT_CREDITS,
    INVALID_REQUEST,
    UNPRICED_MODEL,
    AiHandlerError,
)
from ai_handler_dagster.pricing import PriceBook, UnpricedModel
from ai_handler_dagster.provider_costs import Usage

# Every state change below is also appended to the generation event log (events.py).
events.install()

__all__ = [
    "MAX_INPUT_BYTES",
    "AttemptMismatch",
    "Cancellation",
    "CannotAfford",
    "CannotCancel",
    "EmptyOutput",
    "InvalidRequest",
    "InvalidTransition",
    "PredictionOwned",
    "PriorityNotAllowed",
    "RequestConflict",
    "SubmitRequest",
    "UnknownGeneration",
    "UnknownModel",
    "UnknownUser",
    "as_dict",
    "attempts_without_cost",
    "begin_create",
    "cancel",
    "claim_pending",
    "cost_unknown",
    "create_in_flight",
    "create_lost",
    "creating_siblings",
    "fail",
    "get",
    "hold_key",
    "input_sha256",
    "learned_model_names",
    "owned_predictions",
    "record_prediction",
    "record_provider_cost",
    "requeue",
    "resume",
    "start_attempt",
    "stored_request_problem",
    "submissions",
    "submit",
    "succeed",
    "validate_input",
    "verify",
]

#: Largest accepted input, serialized as compact UTF-8 JSON.
MAX_INPUT_BYTES = 64 * 1024
#: Deepest accepted nesting of the input (guards the validator and the provider alike).
MAX_INPUT_DEPTH = 32
MAX_ERROR_MESSAGE_LENGTH = 4000

_SHA256 = re.compile(r"[0-9a-f]{64}")


class InvalidRequest(AiHandlerError, ValueError):
    """A request that ``submit`` refuses; the message names what was wrong. Nothing was written.

    ``field`` names the part of the request at fault (``user_id``, ``model``, ``input``,
    ``request_id``, ``priority``) when one is; the subclasses say why a well-formed request was
    refused, so that an HTTP API can answer each with its own status.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class CannotAfford(InvalidRequest, ledger.InsufficientCredits):
    """The user's available credits do not cover the hold the request would need right now."""

    def __init__(self, user_id: str, available: int, needed: int) -> None:
        ledger.InsufficientCredits.__init__(self, user_id, available, needed)
        self.field = None


class UnknownUser(InvalidRequest):
    """The user has no credit account (nobody granted them credits yet)."""


class UnknownModel(InvalidRequest):
    """The model reference is well formed but has no price (it cannot be run here)."""


class PriorityNotAllowed(InvalidRequest):
    """A priority in range but above what the user's tier (or the caller) may ask for."""


class RequestConflict(InvalidRequest):
    """The ``request_id`` was used before, by ``generation_id``, for a different request."""

    def __init__(self, message: str, *, field: str | None, generation_id: int) -> None:
        super().__init__(message, field=field)
        self.generation_id = generation_id


class TooManyWaiting(InvalidRequest):
    """The user already has ``max_waiting`` generations waiting (pending or queued)."""

    def __init__(self, user_id: str, limit: int) -> None:
        super().__init__(f"user {user_id!r} has {limit} generations waiting", field=None)
        self.limit = limit


class UnknownGeneration(AiHandlerError, LookupError):
    """No generation has this id."""

    def __init__(self, generation_id: int) -> None:
        super().__init__(f"unknown generation {generation_id}")
        self.generation_id = generation_id


class InvalidTransition(AiHandlerError):
    """The generation is not in a state that allows this transition (the message says which)."""


class EmptyOutput(AiHandlerError):
    """A generation would succeed with nothing stored for a model that must return something:
    no charge without a delivered output."""


# --- helpers ----------------------------------------------------------------------------------


#: The statuses of a generation that waits for a run (``submission``'s ``max_waiting`` counts
#: them; so do the HTTP API's backlog limits).
WAITING = (GenerationStatus.PENDING, GenerationStatus.QUEUED)


def hold_key(generation_id: int, attempt: int) -> str:
    """Idempotency key of the one hold of a generation attempt."""
    return f"gen:{generation_id}:a{attempt}:hold"


def get(session: Session, generation_id: int) -> Generation:
    """The generation (not locked); ``UnknownGeneration`` if there is none."""
    row = session.get(Generation, generation_id)
    if row is None:
        raise UnknownGeneration(generation_id)
    return row


def _lock(session: Session, generation_id: int) -> Generation:
    # The input is not decoded here: no transition needs it, and a row an application wrote by
    # hand may hold text that is not JSON at all (SQLite does not check). Reading it is left to
    # ``start_attempt``, which fails such a row instead of raising.
    row = session.scalars(
        sa.select(Generation)
        .where(Generation.id == generation_id)
        .options(defer(Generation.input))
        .with_for_update()
        .execution_options(populate_existing=True)
    ).first()
    if row is None:
        raise UnknownGeneration(generation_id)
    return row


def _text(value: object, what: str) -> str:
    try:
        return check_identifier(value, what, error=InvalidRequest)
    except InvalidRequest as exc:
        raise InvalidRequest(str(exc), field=what) from None


def _check_string(value: str, where: str) -> None:
    check_text(value, where, error=InvalidRequest)


def _walk(value: object, where: str, depth: int) -> None:
    if depth > MAX_INPUT_DEPTH:
        raise InvalidRequest(f"{where} is nested more than {MAX_INPUT_DEPTH} levels deep")
    if value is None or isinstance(value, bool | int):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidRequest(f"{where} is {value!r}, which JSON cannot represent")
        return
    if isinstance(value, str):
        _check_string(value, where)
        return
    if isinstance(value, list):
        for index, item in enumerate(value):
            _walk(item, f"{where}[{index}]", depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidRequest(f"{where} has a non-string key {key!r}")
            _check_string(key, f"{where} key {key!r}")
            _walk(item, f"{where}[{key!r}]", depth + 1)
        return
    raise InvalidRequest(f"{where} is a {type(value).__name__}, which is not a JSON value")


def validate_input(value: object) -> dict[str, Any]:
    """Check a model input: a JSON object, clean text, at most ``MAX_INPUT_BYTES`` serialized.

    Returns the input as it will be stored; ``InvalidRequest`` names the offending field.
    """
    if not isinstance(value, dict):
        raise InvalidRequest(f"input must be a JSON object, got {type(value).__name__}")
    _walk(value, "input", 0)
    size = len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
    if size > MAX_INPUT_BYTES:
        raise InvalidRequest(f"input is {size} bytes as JSON; the limit is {MAX_INPUT_BYTES}")
    return value


def stored_request_problem(row: Generation) -> str | None:
    """Why a stored request cannot run, or None: what ``submit`` would have refused.

    Applications may insert rows straight into the table, bypassing ``submit``. A malformed user
    id, model reference or input is found here, before any credit is held or the provider is
    called, so that it fails only its own generation.
    """
    try:
        _text(row.user_id, "user_id")
        parse_model_ref(row.model)
        try:
            payload = row.input
        except ValueError as exc:  # json.JSONDecodeError: SQLite keeps whatever text was written
            return f"input is not valid JSON: {exc}"
        except RecursionError:
            # Both databases store JSON nested thousands of levels deep; decoding it overflows.
            return f"input is nested too deeply to decode (at most {MAX_INPUT_DEPTH} levels)"
        validate_input(payload)
    except ValueError as exc:  # InvalidRequest is one
        return str(exc)
    return None


def _same_request(existing: Generation, request: SubmitRequest) -> Generation:
    if (
        existing.user_id != request.user_id
        or existing.model != request.model
        or existing.input != request.input
        or (request.priority is not None and existing.priority != request.priority)
    ):
        raise RequestConflict(
            f"request_id {existing.request_id!r} was already used for generation {existing.id} "
            "with a different user, model, input or priority",
            field="request_id",
            generation_id=existing.id,
        )
    return existing


def _finish(
    row: Generation, status: str, code: str | None, message: str | None, now: datetime
) -> None:
    row.status = status
    row.error_code = code
    row.error_message = message[:MAX_ERROR_MESSAGE_LENGTH] if message else None
    row.finished_at = now


# --- transitions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Submission:
    """What ``submission`` did: the generation, and whether this call created it (False: a
    repeated ``request_id`` answered with the first request's row)."""

    generation: Generation
    created: bool


def submit(
    session: Session,
    *,
    user_id: str,
    model: str,
    input: dict[str, Any],
    request_id: str | None = None,
    prices: PriceBook,
    hold_ttl: timedelta | None = None,
    priority: int | None = None,
    max_priority: int | None = None,
    max_waiting: int | None = None,
) -> Generation:
    """Create a pending generation, holding its price: ``submission``'s generation."""
    return submission(
        session,
        user_id=user_id,
        model=model,
        input=input,
        request_id=request_id,
        prices=prices,
        hold_ttl=hold_ttl,
        priority=priority,
        max_priority=max_priority,
        max_waiting=max_waiting,
    ).generation


def submission(
    session: Session,
    *,
    user_id: str,
    model: str,
    input: dict[str, Any],
    request_id: str | None = None,
    prices: PriceBook,
    hold_ttl: timedelta | None = None,
    priority: int | None = None,
    max_priority: int | None = None,
    max_waiting: int | None = None,
) -> Submission:
    """Create a pending generation, holding its price, after validating the request.

    Refuses with ``InvalidRequest`` (nothing written) an unknown user, a malformed or unpriced
    model, a bad input, a ``priority`` out of range or above the user's ceiling
    (``priorities.resolve``; None means the ceiling), or a user who cannot afford the hold
    (``CannotAfford``, which is also a ``ledger.InsufficientCredits``): what the user's earlier
    requests hold counts, so a user with 5 credits cannot queue two requests of 5. A repeated
    ``request_id`` returns the existing row if user, model and input (and ``priority``, when
    given) are the same, and is refused otherwise. The hold (the first
    attempt's, ``hold_key(id, 1)``) lives ``hold_ttl``, by default
    ``lifetimes.default_hold_lifetime()``; ``start_attempt`` takes it over when the run begins.
    A row an application inserts directly is held there instead.

    ``max_priority`` caps the priority further (the calling API key's limit): a request above
    it is refused, and one naming none runs at the lower of the two ceilings. With
    ``max_waiting`` a user who already has that many generations waiting is refused
    (``TooManyWaiting``). It is a load limit, not money: counted in the statement that locks
    the account, it sees what had committed when that statement began, so submits of one user
    that race each other can pass it by as many as race.

    On PostgreSQL a new generation costs three statements: the account locked together with
    what the checks read and the new ids, then every write (generation, hold, entry, account,
    event) as one statement. ``submissions`` does the same for many requests at once.

    Each refusal is an ``InvalidRequest`` with ``field`` set where one part is at fault; the
    subclasses ``UnknownUser``, ``UnknownModel``, ``PriorityNotAllowed``, ``RequestConflict``
    ``TooManyWaiting`` and ``CannotAfford`` say why a well-formed request was refused.
    """
    request = _checked(SubmitRequest(user_id, model, input, request_id, priority, max_priority))
    _check_max_waiting(max_waiting)
    if request.request_id is not None:
        replay = _replay(session, request)
        if replay is not None:
            return replay
    needed = _needed(prices, request)
    dialect = "sqlite" if is_sqlite(session) else "postgresql"
    session.flush()  # what a query through the session would do first (autoflush)
    connection = session.connection()
    # Locked now, so what is available cannot change before the hold is placed.
    found = connection.execute(
        _LOCK_FOR_SUBMIT[dialect], {"user_id": request.user_id, "waiting_cap": max_waiting or 0}
    ).first()
    if found is None:
        raise _unknown_user(request.user_id)
    if request.request_id is not None:
        # Read again now that the lock is ours: a duplicate that held it committed meanwhile,
        # and this repeat must answer its row, not be refused for the credits it holds
        # (regression: a retry of a request the user could afford once was answered 402).
        replay = _replay(session, request)
        if replay is not None:
            return replay
    account = ledger.LockedAccount(found.id, request.user_id, found.balance, found.held)
    granted = _granted(
        request, found.ceiling, found.waiting, account.available, needed, max_waiting
    )
    now = utcnow()
    expires_at = _hold_expiry(now, hold_ttl)
    generation_id, hold_id = int(found.generation_id), int(found.hold_id)
    params = {
        **{f"new_{k}_": v for k, v in _values(request, granted).items()},
        "new_id_": generation_id,
        "new_at_": now,
        **ledger.hold_params(
            account,
            hold_id,
            needed,
            hold_key(generation_id, 1),
            generation_id=generation_id,
            expires_at=expires_at,
            now=now,
        ),
        "event_generation_": generation_id,
        "event_at_": now,
    }
    # Only a repeated request_id can meet a unique index here (the hold's key is made from the
    # new id), so only then does a SAVEPOINT keep the caller's transaction usable after losing
    # the race to a concurrent duplicate.
    scope = session.begin_nested() if request.request_id is not None else contextlib.nullcontext()
    try:
        with scope:
            # Asked for again: the session emits its SAVEPOINT when its connection is next used.
            writer = session.connection()
            if dialect == "postgresql":
                writer.execute(_WRITE_SUBMISSION, params)
            else:
                for statement in _SUBMISSION_WRITES:
                    writer.execute(statement, params)
    except IntegrityError:
        if request.request_id is None:
            raise
        replay = _replay(session, request)
        if replay is None:
            raise
        return replay
    ledger.forget_account(session, account.id)
    return _attach(session, request, granted, generation_id, hold_id, needed, now)


@dataclass(frozen=True)
class SubmitRequest:
    """One request of ``submissions``: ``submission``'s arguments that differ per request."""

    user_id: str
    model: str
    input: dict[str, Any]
    request_id: str | None = None
    priority: int | None = None
    max_priority: int | None = None


def submissions(
    session: Session,
    requests: Sequence[SubmitRequest],
    *,
    prices: PriceBook,
    hold_ttl: timedelta | None = None,
    max_waiting: int | None = None,
) -> list[Submission | InvalidRequest]:
    """``submission`` for each of ``requests`` in the caller's transaction, with few statements
    for all of them: each answer is the ``Submission`` or the refusal (an ``InvalidRequest``,
    not raised) that ``submission`` would give the request, in order, had the requests come one
    after another, the earlier ones' holds counting against the later ones' credits.

    On PostgreSQL every account the requests name is locked with one statement (in id order,
    as concurrent batches lock them, so two batches cannot deadlock), which also reads what the
    checks need and allocates the new ids; the repeats' earlier rows are read with one more; and
    every write of every accepted request is one statement, whatever their number. From the
    first request whose ``request_id`` an earlier one in the batch uses, the requests are
    submitted alone afterwards, in order (their accounts are among those locked first, so that
    too keeps the id order); if the write meets a unique index (a concurrent duplicate won),
    it is rolled back and every request is submitted alone, in order. On SQLite, whose writers
    hold the database's lock, the requests go through ``submission`` one after another.

    ``ValueError`` for a bad ``max_waiting``; a database error propagates (roll back).
    """
    _check_max_waiting(max_waiting)
    answers: list[Submission | InvalidRequest | None] = [None] * len(requests)
    alone = is_sqlite(session)
    one_by_one = list(range(len(requests))) if alone else []
    together: dict[int, SubmitRequest] = {}
    users: set[str] = set()
    seen: set[str] = set()
    for i, raw in enumerate(requests):
        if alone:
            break
        try:
            request = _checked(raw)
        except InvalidRequest as exc:
            answers[i] = exc
            continue
        users.add(request.user_id)
        if one_by_one or (request.request_id is not None and request.request_id in seen):
            # From the first repeat of a request_id in the batch on, every request goes alone,
            # in order: whether the repeat creates, replays or conflicts depends on what the
            # requests before it did.
            one_by_one.append(i)
            continue
        if request.request_id is not None:
            seen.add(request.request_id)
        together[i] = request
    if users:
        redo = _submit_together(session, together, users, answers, prices, hold_ttl, max_waiting)
        one_by_one = sorted({*redo, *one_by_one})
    for i in one_by_one:
        raw = requests[i]
        try:
            answers[i] = submission(
                session,
                user_id=raw.user_id,
                model=raw.model,
                input=raw.input,
                request_id=raw.request_id,
                prices=prices,
                hold_ttl=hold_ttl,
                priority=raw.priority,
                max_priority=raw.max_priority,
                max_waiting=max_waiting,
            )
        except InvalidRequest as exc:
            answers[i] = exc
    assert all(answer is not None for answer in answers)  # every request was answered
    return answers  # type: ignore[return-value]


def _submit_together(
    session: Session,
    requests: Mapping[int, SubmitRequest],
    users: Collection[str],
    answers: list[Submission | InvalidRequest | None],
    prices: PriceBook,
    hold_ttl: timedelta | None,
    max_waiting: int | None,
) -> list[int]:
    """PostgreSQL's ``submissions`` of checked requests with distinct request ids, after the
    accounts of ``users`` (theirs and those of the requests to submit alone afterwards) are
    locked in id order: fills ``answers``; returns the positions to submit alone instead, in
    order (every one, with their answers cleared, if the write met a unique index: a request
    that then replays or conflicts holds nothing, so the later ones' answers may change)."""
    session.flush()
    connection = session.connection()
    locked = {
        row.user_id: row
        for row in connection.execute(
            _LOCK_FOR_BATCH,
            {"users": sorted(users), "waiting_cap": max_waiting or 0, "n": len(requests)},
        )
    }
    repeats = [r.request_id for r in requests.values() if r.request_id is not None]
    earlier = _earlier(session, repeats) if repeats else {}
    first = next(iter(locked.values()), None)
    new_ids = iter((first.generation_ids if first is not None else None) or ())
    new_hold_ids = iter((first.hold_ids if first is not None else None) or ())
    spent: Counter[str] = Counter()  # credits this batch holds, per user
    queued: Counter[str] = Counter()  # generations this batch adds, per user
    now = utcnow()
    expires_at = _hold_expiry(now, hold_ttl)
    writes: list[_Write] = []
    for i, request in requests.items():
        try:
            if request.request_id is not None and request.request_id in earlier:
                existing = _same_request(earlier[request.request_id], request)
                answers[i] = Submission(existing, False)
                continue
            needed = _needed(prices, request)
            found = locked.get(request.user_id)
            if found is None:
                raise _unknown_user(request.user_id)
            available = found.balance - found.held - spent[request.user_id]
            waiting = found.waiting + queued[request.user_id]
            granted = _granted(request, found.ceiling, waiting, available, needed, max_waiting)
        except InvalidRequest as exc:
            answers[i] = exc
            continue
        ledger.check_amount(needed)
        spent[request.user_id] += needed
        queued[request.user_id] += 1
        writes.append(
            _Write(i, request, granted, next(new_ids), next(new_hold_ids), found.id, needed)
        )
    if not writes:
        return []
    params: dict[str, Any] = {
        "at": now,
        "expires_at": expires_at,
        "ids_": [w.generation_id for w in writes],
        "request_ids_": [w.request.request_id for w in writes],
        "user_ids_": [w.request.user_id for w in writes],
        "models_": [w.request.model for w in writes],
        "inputs_": [json.dumps(w.request.input) for w in writes],
        "prioritys_": [w.granted for w in writes],
        "hold_ids_": [w.hold_id for w in writes],
        "hold_keys_": [hold_key(w.generation_id, 1) for w in writes],
        "account_ids_": [w.account_id for w in writes],
        "amounts_": [w.amount for w in writes],
    }
    scope = session.begin_nested() if repeats else contextlib.nullcontext()
    try:
        with scope:
            session.connection().execute(_WRITE_BATCH, params)
    except IntegrityError:
        if not repeats:
            raise
        for i in requests:
            answers[i] = None
        return sorted(requests)
    for account_id in {w.account_id for w in writes}:
        ledger.forget_account(session, account_id)
    for w in writes:
        answers[w.position] = _attach(
            session, w.request, w.granted, w.generation_id, w.hold_id, w.amount, now
        )
    return []


class _Write(NamedTuple):
    """An accepted request of a batch, with what its writes need."""

    position: int
    request: SubmitRequest
    granted: int  # its priority
    generation_id: int
    hold_id: int
    account_id: int
    amount: int  # its hold


def _checked(request: SubmitRequest) -> SubmitRequest:
    """``request`` as it will be stored, if well formed (``InvalidRequest`` otherwise): what
    ``submission`` checks before it reads anything."""
    user_id = _text(request.user_id, "user_id")
    model = request.model
    if not isinstance(model, str):
        raise InvalidRequest(
            f"model must be a string 'owner/name[:version]' or 'deployment:owner/name', "
            f"got {model!r}",
            field="model",
        )
    try:
        parse_model_ref(model)
    except InvalidModelRef as exc:
        raise InvalidRequest(str(exc), field="model") from None
    if request.priority is not None:
        try:
            priorities.check_priority(request.priority)
        except priorities.PriorityRefused as exc:
            raise InvalidRequest(str(exc), field="priority") from None
    try:
        payload = validate_input(request.input)
    except InvalidRequest as exc:
        raise InvalidRequest(str(exc), field="input") from None
    request_id = request.request_id
    if request_id is not None:
        request_id = _text(request_id, "request_id")
    return SubmitRequest(
        user_id, model, payload, request_id, request.priority, request.max_priority
    )


def _hold_expiry(now: datetime, hold_ttl: timedelta | None) -> datetime:
    """When a hold placed at submit ``now`` expires (``hold_ttl``, or the default lifetime)."""
    return now + (hold_ttl if hold_ttl is not None else lifetimes.default_hold_lifetime())


def _check_max_waiting(max_waiting: int | None) -> None:
    if max_waiting is not None and (isinstance(max_waiting, bool) or max_waiting < 1):
        raise ValueError(f"max_waiting must be a positive whole number, got {max_waiting!r}")


def _needed(prices: PriceBook, request: SubmitRequest) -> int:
    """What the request holds, if its model is priced and its input fits the price."""
    try:
        price = prices.price_for(request.model)
    except UnpricedModel as exc:
        raise UnknownModel(str(exc), field="model") from None
    problem = price.input_problem(request.input)
    if problem is not None:
        raise InvalidRequest(problem, field="input")
    return price.hold_amount(request.input)


def _unknown_user(user_id: str) -> UnknownUser:
    return UnknownUser(
        f"unknown user {user_id!r}: the user has no credit account (grant credits first)",
        field="user_id",
    )


def _granted(
    request: SubmitRequest,
    listed_ceiling: int | None,
    waiting: int,
    available: int,
    needed: int,
    max_waiting: int | None,
) -> int:
    """The priority the request runs at, if the user (whose account is locked) may make it."""
    priority, max_priority = request.priority, request.max_priority
    if max_priority is not None and priority is not None and priority > max_priority:
        raise PriorityNotAllowed(
            f"priority {priority} is above the highest this caller may ask for ({max_priority})",
            field="priority",
        )
    try:
        granted = priorities.resolve_under(
            priorities.ceiling_of(listed_ceiling), request.user_id, priority
        )
    except priorities.PriorityRefused as exc:
        raise PriorityNotAllowed(str(exc), field="priority") from None
    if max_priority is not None:
        granted = min(granted, max_priority)
    if max_waiting is not None and waiting >= max_waiting:
        raise TooManyWaiting(request.user_id, max_waiting)
    if available < needed:
        raise CannotAfford(request.user_id, available, needed)
    return granted


def _values(request: SubmitRequest, granted: int) -> dict[str, Any]:
    return {
        "request_id": request.request_id,
        "user_id": request.user_id,
        "model": request.model,
        "input": request.input,
        "priority": granted,
    }


def _attach(
    session: Session,
    request: SubmitRequest,
    granted: int,
    generation_id: int,
    hold_id: int,
    needed: int,
    now: datetime,
) -> Submission:
    """The new generation just written with Core, as a persistent object of ``session``."""
    row = Generation(
        id=generation_id,
        **_values(request, granted),
        status=GenerationStatus.PENDING,
        attempt=1,
        pending_since=now,
        created_at=now,
        updated_at=now,
        hold_id=hold_id,
        amount_held=needed,
        amount_charged=0,
        **dict.fromkeys(_NULL_AT_SUBMIT),
    )
    # Persistent without reading it back: every column is the value just written. Unlike a row
    # the ORM inserted, the session would keep it after a rollback of this transaction (the
    # row then does not exist, and on SQLite its id is given to the next insert), so it is
    # expunged then, as the ORM expunges its own inserts (_forget_rolled_back).
    make_transient_to_detached(row)
    session.add(row)
    innermost = session.get_nested_transaction() or session.get_transaction()
    session.info.setdefault(_WRITTEN, []).append((row, innermost))
    return Submission(row, True)


#: ``Session.info`` key: the rows ``submission`` attached, with the transaction that wrote them.
_WRITTEN = "ai_handler_dagster.submitted"


@sa.event.listens_for(Session, "after_soft_rollback")
def _forget_rolled_back(session: Session, previous_transaction: Any) -> None:
    written = session.info.get(_WRITTEN)
    if not written:
        return
    kept = []
    for row, transaction in written:
        ended = transaction
        while ended is not None and ended is not previous_transaction:
            ended = ended.parent
        if ended is None:
            kept.append((row, transaction))
        elif row in session:
            session.expunge(row)
    session.info[_WRITTEN] = kept


@sa.event.listens_for(Session, "after_commit")
def _forget_committed(session: Session) -> None:
    session.info.pop(_WRITTEN, None)


def _replay(session: Session, request: SubmitRequest) -> Submission | None:
    """The first request's row if ``request``'s ``request_id`` was used (``RequestConflict`` if
    for another request), None if it was not."""
    assert request.request_id is not None
    existing = _earlier(session, [request.request_id]).get(request.request_id)
    if existing is None:
        return None
    return Submission(_same_request(existing, request), False)


def _earlier(session: Session, request_ids: Collection[str]) -> dict[str, Generation]:
    """The generations with these ``request_id``s, as stored now (the unique index answers)."""
    return {
        row.request_id: row
        for row in session.scalars(
            sa.select(Generation)
            .where(Generation.request_id.in_(request_ids))
            .execution_options(populate_existing=True)
        )
        if row.request_id is not None
    }


def _capped_waiting(user_id: sa.ColumnExpressionArgument[str]) -> sa.ScalarSelect[int]:
    """How many generations of ``user_id`` wait, counted up to ``waiting_cap``."""
    waiting = sa.select(Generation.id).where(
        # Through ix_generations_status_priority_user_id_id: naming every status and priority
        # (as literals, so the statement compiles once) lets both databases seek (status,
        # priority, user) directly rather than walk the user's history or every waiting row.
        Generation.status.in_([sa.literal_column(f"'{s}'") for s in WAITING]),
        Generation.priority.in_(
            [sa.literal_column(str(p)) for p in range(MIN_PRIORITY, MAX_PRIORITY + 1)]
        ),
        Generation.user_id == user_id,
    )
    # The enclosing statement's accounts row, when user_id is its column (the batch's lock).
    capped = waiting.limit(sa.bindparam("waiting_cap", type_=sa.Integer)).correlate(Account)
    return sa.select(sa.func.count()).select_from(capped.subquery()).scalar_subquery()


def _lock_for_submit(dialect: str) -> sa.Executable:
    """The user's account, locked, with what submit's checks read (the operator's priority
    ceiling; the generations waiting, counted up to ``waiting_cap``) and the ids the new
    generation and its hold will have: one round trip."""
    return (
        sa.select(
            Account.id,
            Account.balance,
            Account.held,
            priorities.LISTED_CEILING.label("ceiling"),
            _capped_waiting(sa.bindparam("user_id")).label("waiting"),
            ledger.next_id(Generation, dialect).label("generation_id"),
            ledger.next_id(Hold, dialect).label("hold_id"),
        )
        .where(Account.user_id == sa.bindparam("user_id"))
        .with_for_update(of=Account)
    )


_LOCK_FOR_SUBMIT = {d: _lock_for_submit(d) for d in ("postgresql", "sqlite")}


def _new(name: str) -> sa.BindParameter[Any]:
    return sa.bindparam(f"new_{name}_", type_=Generation.__table__.c[name].type)


#: A submission's writes in an order every foreign key accepts one at a time (SQLite checks each
#: statement): the hold, its entry and the account's ``held``; the generation; its first event.
_SUBMISSION_WRITES: tuple[sa.Executable, ...] = (
    *ledger.HOLD_WRITES,
    sa.insert(Generation).values(
        id=_new("id"),
        request_id=_new("request_id"),
        user_id=_new("user_id"),
        model=_new("model"),
        input=_new("input"),
        status=GenerationStatus.PENDING,
        attempt=1,
        priority=_new("priority"),
        pending_since=sa.bindparam("new_at_", type_=Generation.pending_since.type),
        created_at=sa.bindparam("new_at_", type_=Generation.created_at.type),
        updated_at=sa.bindparam("new_at_", type_=Generation.updated_at.type),
        hold_id=sa.bindparam("hold_id_", type_=Generation.hold_id.type),
        amount_held=sa.bindparam("hold_amount_", type_=Generation.amount_held.type),
        amount_charged=0,
    ),
    events.FIRST_EVENT,
)
#: The same writes as one PostgreSQL statement (data-modifying CTEs; foreign keys are checked
#: when the whole statement ends), so a submission's writes cost one round trip.
_WRITE_SUBMISSION = sa.select(sa.literal(1)).add_cte(
    *(statement.cte(f"write_{i}") for i, statement in enumerate(_SUBMISSION_WRITES))  # type: ignore[attr-defined]
)


def _lock_for_batch() -> sa.Executable:
    """``_lock_for_submit`` for the accounts of many users at once (PostgreSQL): each account
    locked, in id order, with its user's ceiling and waiting generations, and ``n`` new ids of
    generations and of holds (the same arrays on every row: uncorrelated, they run once)."""
    ceiling = (
        sa.select(UserPriority.max_priority)
        .where(UserPriority.user_id == Account.user_id)
        .correlate(Account)
        .scalar_subquery()
    )
    series = sa.func.generate_series(1, sa.bindparam("n", type_=sa.Integer))

    def new_ids(model: type[Any]) -> sa.ScalarSelect[Any]:
        next_id = ledger.next_id(model, "postgresql")
        return sa.select(sa.func.array_agg(next_id)).select_from(series).scalar_subquery()

    return (
        sa.select(
            Account.id,
            Account.user_id,
            Account.balance,
            Account.held,
            ceiling.label("ceiling"),
            _capped_waiting(Account.user_id).label("waiting"),
            new_ids(Generation).label("generation_ids"),
            new_ids(Hold).label("hold_ids"),
        )
        .where(Account.user_id == sa.any_(sa.bindparam("users", type_=ARRAY(sa.String))))
        .order_by(Account.id)
        .with_for_update(of=Account)
    )


_LOCK_FOR_BATCH = _lock_for_batch()


def _write_batch() -> sa.Executable:
    """Every write of many new generations as one PostgreSQL statement: ``_SUBMISSION_WRITES``
    with a row per generation from arrays (one array per value, all in the same order), the
    account's ``held`` raised once per account by the sum of its holds."""

    def array(name: str, type_: Any) -> sa.ColumnElement[Any]:
        # Named apart from every column: an UPDATE takes a parameter named as a column for
        # that column's new value.
        return sa.bindparam(f"{name}s_", type_=ARRAY(type_))

    rows = (
        sa.func.unnest(
            array("id", sa.BigInteger()),
            array("request_id", sa.String()),
            array("user_id", sa.String()),
            array("model", sa.String()),
            array("input", sa.Text()),
            array("priority", sa.Integer()),
            array("hold_id", sa.BigInteger()),
            array("hold_key", sa.String()),
            array("account_id", sa.BigInteger()),
            array("amount", sa.BigInteger()),
        )
        .table_valued(
            "id",
            "request_id",
            "user_id",
            "model",
            "input",
            "priority",
            "hold_id",
            "hold_key",
            "account_id",
            "amount",
        )
        .render_derived(name="rows")
    )
    batch = sa.select(rows).cte("batch")
    b = batch.c
    at = sa.bindparam("at", type_=Generation.created_at.type)
    holds = sa.insert(Hold).from_select(
        [
            "id",
            "account_id",
            "generation_id",
            "idempotency_key",
            "amount",
            "status",
            "captured_amount",
            "expires_at",
            "created_at",
        ],
        sa.select(
            b.hold_id,
            b.account_id,
            b.id,
            b.hold_key,
            b.amount,
            sa.literal(HoldStatus.PENDING.value, type_=Hold.status.type),
            sa.literal(0, type_=Hold.captured_amount.type),
            sa.bindparam("expires_at", type_=Hold.expires_at.type),
            at,
        ),
    )
    entries = sa.insert(LedgerEntry).from_select(
        [
            "account_id",
            "hold_id",
            "kind",
            "amount",
            "balance_delta",
            "held_delta",
            "idempotency_key",
            "created_at",
        ],
        sa.select(
            b.account_id,
            b.hold_id,
            sa.literal(EntryKind.HOLD.value, type_=LedgerEntry.kind.type),
            b.amount,
            sa.literal(0, type_=LedgerEntry.balance_delta.type),
            b.amount,
            sa.literal("hold:", type_=sa.String()) + b.hold_key,
            at,
        ),
    )
    per_account = (
        sa.select(b.account_id, sa.cast(sa.func.sum(b.amount), sa.BigInteger()).label("amount"))
        .group_by(b.account_id)
        .subquery("per_account")
    )
    held = (
        sa.update(Account)
        .where(Account.id == per_account.c.account_id)
        .values(held=Account.held + per_account.c.amount, updated_at=at)
    )
    created = sa.insert(Generation).from_select(
        [
            "id",
            "request_id",
            "user_id",
            "model",
            "input",
            "status",
            "attempt",
            "priority",
            "pending_since",
            "created_at",
            "updated_at",
            "hold_id",
            "amount_held",
            "amount_charged",
        ],
        sa.select(
            b.id,
            b.request_id,
            b.user_id,
            b.model,
            sa.cast(b.input, Generation.input.type),
            sa.literal(GenerationStatus.PENDING.value, type_=Generation.status.type),
            sa.literal(1, type_=Generation.attempt.type),
            b.priority,
            at,
            at,
            at,
            b.hold_id,
            b.amount,
            sa.literal(0, type_=Generation.amount_charged.type),
        ),
    )
    first_events = sa.insert(GenerationEvent).from_select(
        ["generation_id", "attempt", "status", "error_code", "at"],
        sa.select(
            b.id,
            sa.literal(1, type_=GenerationEvent.attempt.type),
            sa.literal(GenerationStatus.PENDING.value, type_=GenerationEvent.status.type),
            sa.null(),
            at,
        ),
    )
    writes = (holds, entries, held, created, first_events)
    return sa.select(sa.literal(1)).add_cte(
        *(statement.cte(f"batch_write_{i}") for i, statement in enumerate(writes))  # type: ignore[attr-defined]
    )


_WRITE_BATCH = _write_batch()


#: The columns a new generation leaves empty, set on the object ``submission`` returns so
#: reading them does not load the row again.
_NULL_AT_SUBMIT = (
    "batch_key",
    "dagster_run_id",
    "prediction_id",
    "prediction_model",
    "prediction_version",
    "provider_cost_nusd",
    "outputs",
    "error_code",
    "error_message",
    "queued_at",
    "started_at",
    "finished_at",
)


def claim_pending(
    session: Session,
    *,
    limit: int,
    batch_key_fn: Callable[[Sequence[Generation]], str],
    per_user_limit: int | None = None,
    aged_before: datetime | None = None,
    now: datetime | None = None,
) -> list[Generation]:
    """Mark up to ``limit`` pending generations of one priority ``queued`` as one batch.

    Which rows (see ``_choose``): with ``aged_before``, the requests pending since then or
    earlier go first, oldest first, whatever their priority (aging: a low priority waits at
    most that long behind higher ones). Otherwise the highest priority that has a claimable
    row, and within it users take turns (each user's oldest row, then each user's second
    oldest, ...). With ``per_user_limit`` no user gets more than that many generations queued
    or running, so one user's backlog cannot starve the others. Every step reads a bounded
    number of rows through an index, however long the queue (no scan of the backlog).

    ``batch_key_fn(rows)`` names the batch (the sensor's run key); every claimed row gets it with
    ``queued_at``. On PostgreSQL rows locked by another claimer are skipped (``SKIP LOCKED``), so
    concurrent sensors never claim the same row; SQLite serializes the claimers.
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive integer, got {limit!r}")
    skipped: set[int] = set()
    for _ in range(_CLAIM_TRIES):
        ids = _choose(
            session,
            limit=limit,
            per_user_limit=per_user_limit,
            aged_before=aged_before,
            exclude=skipped,
        )
        if not ids:
            return []
        # The sensor needs ids, users and models only; not decoding inputs means a row holding
        # text that is not JSON (possible on SQLite) cannot make every tick fail.
        rows = list(
            session.scalars(
                sa.select(Generation)
                .where(Generation.status == GenerationStatus.PENDING, Generation.id.in_(ids))
                .order_by(Generation.id)
                .options(defer(Generation.input))
                .with_for_update(skip_locked=True)
                .execution_options(populate_existing=True)
            )
        )
        if rows:
            break
        # Another claimer locked every row chosen (it has not committed yet, so they still
        # look pending): choose again without them.
        skipped.update(ids)
    else:
        return []
    key = batch_key_fn(rows)
    now = now or utcnow()
    for row in rows:
        row.status = GenerationStatus.QUEUED
        row.batch_key = key
        row.queued_at = now
    session.flush()
    return rows


#: Choices a claimer makes when concurrent claimers took every row it chose.
_CLAIM_TRIES = 8
#: Largest number of per-user reads in one statement (SQLite allows 500 compound selects).
_USERS_PER_STATEMENT = 100

# The distinct users of one pending priority in user-id order, one index seek each (a "skip
# scan" over ix_generations_status_priority_user_id_id), at most :most of them; a scan of the
# whole priority would read every pending row. Each database gets the form its planner seeks
# with: PostgreSQL, given "status = ... AND user_id > ...", may walk ix_generations_user_id_id
# instead (reading a user's every row to find one of this priority), so there the bounds are
# row comparisons on the index's leading columns, in the index's order, which no other index
# serves; SQLite seeks only with the equalities (with row comparisons it scans the priority).
_SKIP_SCAN = """
    WITH RECURSIVE users(user_id, n) AS (
        SELECT (
            SELECT g.user_id FROM generations g WHERE {first}
            ORDER BY g.status, g.priority, g.user_id LIMIT 1
        ), 1
        UNION ALL
        SELECT (
            SELECT g.user_id FROM generations g WHERE {next}
            ORDER BY g.status, g.priority, g.user_id LIMIT 1
        ), users.n + 1
        FROM users
        WHERE users.user_id IS NOT NULL AND users.n < :most
    )
    SELECT user_id FROM users WHERE user_id IS NOT NULL
"""
_USERS_OF_PRIORITY = {
    "postgresql": sa.text(
        _SKIP_SCAN.format(
            first="(g.status, g.priority, g.user_id) >= (:pending, :priority, '')"
            " AND (g.status, g.priority) <= (:pending, :priority)",
            next="(g.status, g.priority, g.user_id) > (:pending, :priority, users.user_id)"
            " AND (g.status, g.priority) <= (:pending, :priority)",
        )
    ).columns(user_id=sa.String()),
    "sqlite": sa.text(
        _SKIP_SCAN.format(
            first="g.status = :pending AND g.priority = :priority",
            next="g.status = :pending AND g.priority = :priority AND g.user_id > users.user_id",
        )
    ).columns(user_id=sa.String()),
}


def _choose(
    session: Session,
    *,
    limit: int,
    per_user_limit: int | None,
    aged_before: datetime | None,
    exclude: set[int],
) -> list[int]:
    """Ids of the rows to claim as one batch (one priority), none of ``exclude``, or none.
    Read without locks: the caller locks them with ``SKIP LOCKED`` and keeps only those still
    pending."""
    used = _in_flight_by_user(session) if per_user_limit is not None else {}

    def room(user_id: str) -> int:
        if per_user_limit is None:
            return limit
        return max(0, per_user_limit - used.get(user_id, 0))

    if aged_before is not None:
        aged = _aged(session, limit=limit, room=room, aged_before=aged_before, exclude=exclude)
        if aged:
            return aged
    full = {user for user in used if room(user) == 0}
    below: int | None = None
    for _ in range(MAX_PRIORITY - MIN_PRIORITY + 1):
        top = _top_priority(session, below)
        if top is None:
            return []
        ids = _turns(session, priority=top, limit=limit, room=room, full=full, exclude=exclude)
        if ids:
            return ids
        below = top  # every user of this priority is at their limit: the next one down
    return []


def _in_flight_by_user(session: Session) -> dict[str, int]:
    """Generations queued or running per user. The sensor keeps them under
    ``AI_HANDLER_MAX_IN_FLIGHT``, so this reads a bounded number of rows."""
    # Counted here, not with GROUP BY: SQLite would group along ix_generations_user_id_id, reading
    # every row of the table, rather than read the few in-flight rows through a status index.
    return dict(
        Counter(
            session.scalars(sa.select(Generation.user_id).where(Generation.status.in_(IN_FLIGHT)))
        )
    )


def _aged(
    session: Session,
    *,
    limit: int,
    room: Callable[[str], int],
    aged_before: datetime,
    exclude: set[int],
) -> list[int]:
    """The oldest requests pending since ``aged_before`` or earlier, of the priority of the
    oldest one whose user has room, oldest first: a bounded look (``2 * limit`` rows) at the
    front of ``ix_generations_status_pending_since_id``."""
    rows = session.execute(
        sa.select(Generation.id, Generation.user_id, Generation.priority)
        .where(
            Generation.status == GenerationStatus.PENDING,
            Generation.pending_since <= aged_before,
            *_not_in(exclude),
        )
        .order_by(Generation.pending_since, Generation.id)
        .limit(2 * limit)
    ).all()
    taken: dict[str, int] = {}
    chosen: list[int] = []
    priority: int | None = None
    for gid, user, row_priority in rows:
        if taken.get(user, 0) >= room(user) or (priority is not None and row_priority != priority):
            continue
        priority = row_priority
        taken[user] = taken.get(user, 0) + 1
        chosen.append(gid)
        if len(chosen) == limit:
            break
    return chosen


def _not_in(exclude: set[int]) -> list[sa.ColumnElement[bool]]:
    return [Generation.id.not_in(sorted(exclude))] if exclude else []


def _top_priority(session: Session, below: int | None) -> int | None:
    """The highest priority of a pending row (below ``below``): one index seek."""
    query = sa.select(Generation.priority).where(Generation.status == GenerationStatus.PENDING)
    if below is not None:
        query = query.where(Generation.priority < below)
    return session.scalar(query.order_by(Generation.priority.desc()).limit(1))


def _turns(
    session: Session,
    *,
    priority: int,
    limit: int,
    room: Callable[[str], int],
    full: set[str],
    exclude: set[int],
) -> list[int]:
    """Up to ``limit`` pending ids of ``priority`` with users taking turns: each user's oldest
    row (oldest first), then each user's second oldest, and so on, within each user's room.

    Reads at most ``limit`` users (seeking past the ``full`` ones) and, per user, a LIMITed
    range of the index: first an equal share of the batch, then, only if the batch is not full
    (some users had fewer rows), up to the shortfall more from users that had their share.
    The rows left unread could never be chosen: each sorts after ``limit`` rows that were
    read."""
    users = [
        user
        for user in session.scalars(
            _USERS_OF_PRIORITY[session.get_bind().dialect.name],
            {"pending": GenerationStatus.PENDING, "priority": priority, "most": limit + len(full)},
        )
        if user not in full and room(user) > 0
    ][:limit]
    if not users:
        return []
    share = -(-limit // len(users))
    wanted = {user: min(room(user), share) for user in users}
    found = _oldest_rows(session, priority, wanted, after={}, exclude=exclude)
    short = limit - sum(len(ids) for ids in found.values())
    if short > 0:
        more = {
            user: min(room(user) - wanted[user], short)
            for user, ids in found.items()
            if len(ids) == wanted[user] and room(user) > wanted[user]
        }
        after = {user: found[user][-1] for user in more}
        for user, ids in _oldest_rows(
            session, priority, more, after=after, exclude=exclude
        ).items():
            found[user].extend(ids)
    ranked = sorted((turn, gid) for ids in found.values() for turn, gid in enumerate(ids))
    return [gid for _, gid in ranked[:limit]]


def _oldest_rows(
    session: Session,
    priority: int,
    wanted: Mapping[str, int],
    *,
    after: Mapping[str, int],
    exclude: set[int],
) -> dict[str, list[int]]:
    """Each user's oldest ``wanted[user]`` pending ids of ``priority`` (after the id
    ``after[user]``), in id order: one index range with a LIMIT per user, in one statement on
    PostgreSQL (a LATERAL join over the users), in a few on SQLite (a UNION ALL of the users'
    reads; PostgreSQL plans such a union branch by branch, tens of milliseconds for 100)."""
    found: dict[str, list[int]] = {user: [] for user in wanted}
    users = list(wanted)
    if session.get_bind().dialect.name == "postgresql":
        rows = session.execute(
            _OLDEST_ROWS_LATERAL,
            {
                "users": users,
                "wanted": [wanted[user] for user in users],
                "after": [after.get(user, 0) for user in users],
                "exclude": sorted(exclude),
                "pending": GenerationStatus.PENDING,
                "priority": priority,
            },
        ).all()
        for gid, user in sorted(rows):
            found[user].append(gid)
        return found
    for start in range(0, len(users), _USERS_PER_STATEMENT):
        parts = [
            sa.select(Generation.id, Generation.user_id)
            .where(
                Generation.status == GenerationStatus.PENDING,
                Generation.priority == priority,
                Generation.user_id == user,
                *([Generation.id > after[user]] if user in after else []),
                *_not_in(exclude),
            )
            .order_by(Generation.id)
            .limit(wanted[user])
            .subquery()
            .select()
            for user in users[start : start + _USERS_PER_STATEMENT]
        ]
        for gid, user in sorted(session.execute(sa.union_all(*parts)).all()):
            found[user].append(gid)
    return found


# PostgreSQL's form of _oldest_rows: for each (user, wanted, after) one LIMITed range of
# ix_generations_status_priority_user_id_id. Ids start at 1, so "after 0" is from the start.
_OLDEST_ROWS_LATERAL = sa.text(
    """
    SELECT g.id, g.user_id
    FROM unnest(
        CAST(:users AS text[]), CAST(:wanted AS integer[]), CAST(:after AS bigint[])
    ) AS u(user_id, wanted, after_id)
    CROSS JOIN LATERAL (
        SELECT generations.id, generations.user_id FROM generations
        WHERE generations.status = :pending AND generations.priority = :priority
          AND generations.user_id = u.user_id AND generations.id > u.after_id
          AND generations.id <> ALL(CAST(:exclude AS bigint[]))
        ORDER BY generations.id
        LIMIT u.wanted
    ) AS g
    """
).columns(id=sa.BigInteger(), user_id=sa.String())


def start_attempt(
    session: Session,
    generation_id: int,
    *,
    run_id: str,
    prices: PriceBook,
    hold_ttl: timedelta = ledger.DEFAULT_HOLD_TTL,
    now: datetime | None = None,
) -> Generation:
    """Hold the price of the current attempt and mark the generation ``running``.

    The hold lives ``hold_ttl`` (the run computes it, see ``lifetimes.hold_lifetime``).

    Callers must go on only if the returned row is ``running``:

    - already running with this attempt's hold (an op retry or a re-executed run): returned as is,
      and ``dagster_run_id`` moves to ``run_id`` so the old run's failure does not refund it;
    - held since ``submit``: that hold is the attempt's, nothing new is held (a hold that ended
      while the request waited, such as one that expired past the queue allowance, fails the
      generation ``deadline_exceeded``);
    - a request that ``submit`` would have refused (a row written straight into the table with
      a malformed user id, model reference or input, or a priority above its user's ceiling):
      marked ``failed`` (``invalid_request``), nothing held, returned;
    - cannot afford the hold (or the user has no account), or the model lost its price: marked
      ``failed`` (``insufficient_credits`` / ``unpriced_model``), nothing held, returned;
    - already terminal: returned unchanged.
    """
    row = _lock(session, generation_id)
    now = now or utcnow()
    if row.is_terminal:
        return row
    if row.status == GenerationStatus.RUNNING and row.hold_id is not None:
        row.dagster_run_id = run_id
        session.flush()
        return row
    if row.hold_id is not None:
        # Held at submit: a request submit accepted needs no second look. From here on the hold
        # must outlive this run, however long the request waited.
        hold = ledger.extend(session, row.hold_id, now + hold_ttl)
        if hold.status != HoldStatus.PENDING:
            _finish(
                row,
                GenerationStatus.FAILED,
                DEADLINE_EXCEEDED,
                f"the credit hold placed at submit ended before the run started ({hold.status})",
                now,
            )
            session.flush()
            return row
        row.status = GenerationStatus.RUNNING
        row.dagster_run_id = run_id
        row.queued_at = row.queued_at or now
        row.started_at = now
        session.flush()
        return row
    problem = stored_request_problem(row)
    if problem is None and row.attempt == 1:
        # An inserted row names its priority itself: no higher than its user may ask for. A
        # requeued attempt was accepted before and keeps its priority whatever the ceiling now.
        try:
            priorities.resolve(session, row.user_id, row.priority)
        except priorities.PriorityRefused as exc:
            problem = str(exc)
    if problem is not None:
        _finish(row, GenerationStatus.FAILED, INVALID_REQUEST, problem, now)
        session.flush()
        return row
    try:
        price = prices.price_for(row.model)
    except (UnpricedModel, ValueError) as exc:
        _finish(row, GenerationStatus.FAILED, UNPRICED_MODEL, str(exc), now)
        session.flush()
        return row
    # A count the price reads (outputs, tokens) out of the declared range: never hold more.
    problem = price.input_problem(row.input)
    if problem is not None:
        _finish(row, GenerationStatus.FAILED, INVALID_REQUEST, problem, now)
        session.flush()
        return row
    amount = price.hold_amount(row.input)
    try:
        held = ledger.hold(
            session,
            row.user_id,
            amount,
            hold_key(row.id, row.attempt),
            generation_id=row.id,
            ttl=hold_ttl,
            now=now,
        )
    except (ledger.InsufficientCredits, ledger.UnknownAccount) as exc:
        _finish(row, GenerationStatus.FAILED, INSUFFICIENT_CREDITS, str(exc), now)
        session.flush()
        return row
    row.status = GenerationStatus.RUNNING
    row.dagster_run_id = run_id
    row.hold_id = held.id
    row.amount_held = held.amount
    row.queued_at = row.queued_at or now
    row.started_at = now
    session.flush()
    return row


class AttemptMismatch(InvalidTransition):
    """The generation moved on to another attempt (requeued): a run of an earlier attempt may
    not change it."""


class PredictionOwned(InvalidTransition):
    """The prediction already belongs to another generation attempt (now or in the past)."""


def resume(session: Session, generation_id: int, *, batch_key: str) -> bool:
    """Send an unfinished attempt back to ``queued`` under ``batch_key``, keeping its hold, its
    prediction and its attempt: a new run picks it up where its last run stopped. False (nothing
    changed) unless the generation is queued or running."""
    row = _lock(session, generation_id)
    if row.status not in IN_FLIGHT:
        return False
    row.status = GenerationStatus.QUEUED
    row.batch_key = batch_key
    row.dagster_run_id = None
    row.queued_at = utcnow()
    session.flush()
    return True


def record_prediction(
    session: Session,
    generation_id: int,
    prediction_id: str,
    model: str | None,
    version: str | None,
    *,
    attempt: int | None = None,
    how: str = "created",
) -> Generation:
    """Make the prediction the current attempt's own (``how``: the create answer named it,
    ``created``, or it was found after a lost answer, ``adopted``), with the model/version it
    answered with.

    Idempotent for the same prediction id. Raises ``PredictionOwned`` if another attempt (of any
    generation, now or before a requeue) owns this prediction, and ``InvalidTransition`` if the
    generation is not running ``attempt`` (it ended meanwhile, or was requeued) or already has
    another prediction. Nothing is written then.
    """
    if not isinstance(prediction_id, str) or not prediction_id:
        raise ValueError(f"prediction_id must be a non-empty string, got {prediction_id!r}")
    if how not in ("created", "adopted"):
        raise ValueError(f"how must be 'created' or 'adopted', got {how!r}")
    row = _lock(session, generation_id)
    _check_attempt(row, attempt)
    if row.prediction_id == prediction_id:
        row.prediction_model = row.prediction_model or model
        row.prediction_version = row.prediction_version or version
        session.flush()
        return row
    if row.prediction_id is not None:
        raise InvalidTransition(
            f"generation {generation_id} already has prediction {row.prediction_id}; "
            f"refusing {prediction_id}"
        )
    if row.status != GenerationStatus.RUNNING:
        raise InvalidTransition(
            f"generation {generation_id} is {row.status}, not running; prediction {prediction_id} "
            "was not recorded and should be canceled"
        )
    now = utcnow()
    try:
        with session.begin_nested():
            record = _attempt_row(session, row, now)
            record.state, record.state_at = AttemptState.OWNED, now
            record.prediction_id, record.how = prediction_id, how
            record.answered_model, record.answered_version = model, version
            row.prediction_id = prediction_id
            row.prediction_model = model
            row.prediction_version = version
            session.flush()
    except IntegrityError:
        owner = session.execute(
            sa.select(CreateAttempt.generation_id, CreateAttempt.attempt).where(
                CreateAttempt.prediction_id == prediction_id
            )
        ).first()
        if owner is None:
            owner = session.execute(
                sa.select(Generation.id, Generation.attempt).where(
                    Generation.prediction_id == prediction_id
                )
            ).first()
        where = f"generation {owner[0]} attempt {owner[1]}" if owner else "another attempt"
        raise PredictionOwned(f"prediction {prediction_id} already belongs to {where}") from None
    return row


def input_sha256(value: Any) -> str:
    """The sha256 of an input's canonical JSON (sorted keys, no spaces): how a create attempt
    and a prediction in the provider's list are matched without comparing whole documents."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _attempt_row(session: Session, row: Generation, now: datetime) -> CreateAttempt:
    """The ``create_attempts`` row of the generation's current attempt, created if missing (a
    new one is pending in the session: ``record in session.new``)."""
    record = session.get(CreateAttempt, (row.id, row.attempt), populate_existing=True)
    if record is None:
        record = CreateAttempt(
            generation_id=row.id,
            attempt=row.attempt,
            model=row.model,
            input_sha256=input_sha256(row.input),
            started_at=now,
            state=AttemptState.CREATING,
            state_at=now,
        )
        session.add(record)
    return record


def _check_attempt(row: Generation, attempt: int | None) -> None:
    if attempt is not None and row.attempt != attempt:
        raise AttemptMismatch(
            f"generation {row.id} is on attempt {row.attempt}, not {attempt}: a run of an "
            "earlier attempt may not change it"
        )


def begin_create(
    session: Session, generation_id: int, *, attempt: int, now: datetime | None = None
) -> datetime | None:
    """Note that this attempt is about to ask the provider for a prediction (state
    ``creating``).

    Returns when an earlier try of the same attempt first did (None the first time): the
    caller must then look for that prediction and adopt it before creating another, since the
    earlier create may have succeeded with its answer lost. ``InvalidTransition`` if the
    generation is no longer running this attempt (nothing must be created for it).

    A new attempt's ``started_at`` is now only until its first create is sent
    (``create_in_flight(first=True)``, after its turn at the create throttle).
    """
    row = _lock(session, generation_id)
    _check_attempt(row, attempt)
    if row.status != GenerationStatus.RUNNING:
        raise InvalidTransition(f"generation {generation_id} is {row.status}, not running")
    now = now or utcnow()
    record = _attempt_row(session, row, now)
    earlier = None if record in session.new else record.started_at
    if record.state != AttemptState.OWNED:
        record.state, record.state_at = AttemptState.CREATING, now
    session.flush()
    return earlier


def _mark(session: Session, generation_id: int, attempt: int, state: str) -> None:
    """Move an attempt that owns nothing yet to ``state`` as of now."""
    record = session.get(CreateAttempt, (generation_id, attempt), with_for_update=True)
    # Owned and abandoned are for good: an attempt whose generation ended (canceled while its
    # create was in flight) must not look busy again, or the orphan sweeps would spare the
    # prediction a late or lost answer made.
    if record is None or record.state in (AttemptState.OWNED, AttemptState.ABANDONED):
        return
    now = utcnow()
    if state == AttemptState.LOST:
        record.lost_at = record.lost_at or now
    record.state, record.state_at = state, now
    session.flush()


def create_lost(session: Session, generation_id: int, attempt: int) -> None:
    """The attempt's create answer was lost: it now looks for its prediction (state ``lost``,
    ``state_at`` now), so siblings waiting for its answer stop waiting and orphan sweeps leave
    its candidates alone while it looks."""
    _mark(session, generation_id, attempt, AttemptState.LOST)


def create_in_flight(
    session: Session, generation_id: int, attempt: int, *, first: bool = False
) -> datetime | None:
    """A create request of the attempt is about to be sent (state ``creating``, ``state_at``
    now): until its answer is recorded, a listed prediction may be this attempt's.

    ``first``: the attempt's first create ever (``begin_create`` returned None in this try):
    ``started_at``, from which its prediction's deadline and the adoption window count, is
    now too, not when the step began (it may have waited long for a turn at the create
    throttle). Committed before the request is sent, so the window still covers the real
    create. Returns the time written (None: the attempt owns its prediction already).

    ``InvalidTransition`` (nothing is written, and the caller must not send the create) if the
    generation no longer runs this attempt: it was canceled or failed while the create waited
    for its turn or backed off between tries.
    """
    row = _lock(session, generation_id)  # the generation first: the lock order of begin_create
    _check_attempt(row, attempt)
    if row.status != GenerationStatus.RUNNING:
        raise InvalidTransition(
            f"generation {generation_id} is {row.status}, not running: no create is sent"
        )
    _mark(session, generation_id, attempt, AttemptState.CREATING)
    record = session.get(CreateAttempt, (generation_id, attempt))
    if record is None or record.state != AttemptState.CREATING:
        return None
    if first:
        record.started_at = record.state_at
        session.flush()
    return record.state_at


def creating_siblings(
    session: Session, generation_id: int, attempt: int, *, fresh_after: datetime
) -> int:
    """Other attempts of the same model and input whose create is in flight (state
    ``creating`` since ``fresh_after``): a listed prediction may be theirs, answered a moment
    from now, so an attempt that lost its answer must not adopt yet."""
    mine = session.get(CreateAttempt, (generation_id, attempt))
    if mine is None:
        return 0
    return int(
        session.scalar(
            sa.select(sa.func.count())
            .select_from(CreateAttempt)
            .where(
                CreateAttempt.model == mine.model,
                CreateAttempt.input_sha256 == mine.input_sha256,
                CreateAttempt.state == AttemptState.CREATING,
                CreateAttempt.state_at >= fresh_after,
                sa.not_(
                    sa.and_(
                        CreateAttempt.generation_id == generation_id,
                        CreateAttempt.attempt == attempt,
                    )
                ),
            )
        )
        or 0
    )


def learned_model_names(session: Session, model_ref: str) -> set[str]:
    """Model names the provider answered creates of ``model_ref`` with (Replicate answers some
    official models under another name than the one requested)."""
    names = session.scalars(
        sa.select(CreateAttempt.answered_model)
        .where(CreateAttempt.model == model_ref, CreateAttempt.answered_model.is_not(None))
        .distinct()
    ).all()
    return {name for name in names if name}


def owned_predictions(session: Session, prediction_ids: Sequence[str]) -> set[str]:
    """Which of ``prediction_ids`` an attempt (of any generation, any attempt, ever) owns."""
    if not prediction_ids:
        return set()
    found = session.scalars(
        sa.select(CreateAttempt.prediction_id).where(
            CreateAttempt.prediction_id.in_(list(prediction_ids))
        )
    ).all()
    return {pid for pid in found if pid}


def record_provider_cost(
    session: Session,
    generation_id: int,
    *,
    attempt: int,
    prediction_id: str,
    prices: PriceBook,
    status: str,
    output: Any,
    metrics: Mapping[str, Any] | None,
    never_started: bool = False,
    now: datetime | None = None,
) -> int | None:
    """Record what the provider charged for the attempt's finished prediction (nano-USD).

    The cost is the model's provider price (``provider_costs.py``) of what the prediction used:
    its ``status``, ``output`` and ``metrics`` as the provider reported them at its end, failed
    and canceled ones included (they are billed too; ``never_started``: it ran no seconds).
    It is kept on the attempt's ``create_attempts`` row for good, and mirrored on the
    generation while it is still on that attempt. It is priced once per attempt
    (``provider_cost_at`` set): a retried step or a later sweep records nothing new. Returns
    the cost; None when the attempt does not own ``prediction_id``, the model has no provider
    price, or the prediction lacks the measure its price needs (the cost stays unknown).
    Moves no credit.
    """
    row = _lock(session, generation_id)  # the generation first: the lock order of begin_create
    record = session.get(CreateAttempt, (generation_id, attempt), with_for_update=True)
    if record is None or record.prediction_id != prediction_id:
        return None
    if record.provider_cost_at is not None:
        return record.provider_cost_nusd
    price = prices.find(record.model)
    provider = price.provider if price is not None else None
    usage = Usage.of(status, output, metrics, never_started=never_started)
    cost = None if provider is None else provider.cost_nano(usage)
    record.provider_cost_nusd, record.provider_cost_at = cost, now or utcnow()
    if row.attempt == attempt:
        row.provider_cost_nusd = cost
    session.flush()
    return cost


def cost_unknown(session: Session, generation_id: int, *, attempt: int, prediction_id: str) -> None:
    """Note that the attempt's prediction cannot be priced (the provider no longer knows it):
    its cost stays unknown and nobody asks again."""
    _lock(session, generation_id)  # the lock order of record_provider_cost
    record = session.get(CreateAttempt, (generation_id, attempt), with_for_update=True)
    if record is not None and record.prediction_id == prediction_id:
        record.provider_cost_at = record.provider_cost_at or utcnow()
        session.flush()


def attempts_without_cost(
    session: Session, *, since: datetime, limit: int
) -> list[tuple[int, int, str, str]]:
    """(generation id, attempt, prediction id, model) of ended attempts started since ``since``
    whose prediction was never priced (``provider_cost_at`` unset), oldest first: those a
    recovery path ended after its run died, before anyone saw the prediction's end."""
    ended = sa.or_(Generation.attempt != CreateAttempt.attempt, Generation.status.in_(TERMINAL))
    rows = session.execute(
        sa.select(
            CreateAttempt.generation_id,
            CreateAttempt.attempt,
            CreateAttempt.prediction_id,
            CreateAttempt.model,
        )
        .join(Generation, Generation.id == CreateAttempt.generation_id)
        .where(
            CreateAttempt.started_at >= since,
            CreateAttempt.prediction_id.is_not(None),
            CreateAttempt.provider_cost_at.is_(None),
            ended,
        )
        .order_by(CreateAttempt.started_at)
        .limit(limit)
    ).all()
    return [(gid, attempt, str(pid), model) for gid, attempt, pid, model in rows]


def _check_outputs(outputs: object) -> list[dict[str, Any]]:
    if not isinstance(outputs, list):
        raise ValueError(f"outputs must be a list of objects, got {type(outputs).__name__}")
    for index, item in enumerate(outputs):
        if not isinstance(item, Mapping):
            raise ValueError(f"outputs[{index}] must be an object, got {item!r}")
        for field in ("key", "uri", "content_type"):
            if not isinstance(item.get(field), str) or not item[field]:
                raise ValueError(f"outputs[{index}].{field} must be a non-empty string")
        size = item.get("size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"outputs[{index}].size must be a byte count, got {size!r}")
        if not isinstance(item.get("sha256"), str) or not _SHA256.fullmatch(item["sha256"]):
            raise ValueError(f"outputs[{index}].sha256 must be 64 lowercase hex digits")
    return [dict(item) for item in outputs]


def succeed(
    session: Session,
    generation_id: int,
    *,
    outputs: list[dict[str, Any]],
    predict_time: float | None,
    prices: PriceBook,
    metrics: Mapping[str, Any] | None = None,
    attempt: int | None = None,
    prediction_id: str | None = None,
    now: datetime | None = None,
) -> Generation:
    """Capture the charge, store the outputs and mark the generation ``succeeded``.

    With ``attempt`` and ``prediction_id``, the generation must still be running that attempt
    with that prediction (``AttemptMismatch`` / ``InvalidTransition`` otherwise): a run of an
    earlier attempt can never capture a newer attempt's hold with its own output.

    The charge is the model's price for what the prediction used (``predict_time`` if metered,
    the number of ``outputs`` stored if per output, the token counts in ``metrics`` if per
    token) or its fixed price, never more than what was held (a price raised mid-run, or
    removed, or a ``predict_time`` that is not a duration, charges the hold). ``outputs`` is a
    list of ``{key, uri, size, sha256, content_type}`` (extra keys are kept). Idempotent: a
    succeeded row is returned as is. A generation that already failed raises
    ``InvalidTransition``; a hold that was already released or expired raises
    ``ledger.HoldAlreadyEnded``; no outputs, for a model whose price does not say
    ``allow_empty_output``, raises ``EmptyOutput``; in each case nothing is written.
    """
    row = _lock(session, generation_id)
    _check_attempt(row, attempt)
    if prediction_id is not None and row.prediction_id != prediction_id:
        raise InvalidTransition(
            f"generation {generation_id} has prediction {row.prediction_id}, not {prediction_id}"
        )
    if row.status == GenerationStatus.SUCCEEDED:
        return row
    if row.status != GenerationStatus.RUNNING or row.hold_id is None:
        raise InvalidTransition(
            f"generation {generation_id} is {row.status}"
            f"{'' if row.hold_id else ' without a hold'}; it cannot succeed"
        )
    stored = _check_outputs(outputs)
    price = prices.find(row.model)
    if not stored and not (price is not None and price.allow_empty_output):
        raise EmptyOutput(
            f"generation {generation_id}: the prediction succeeded with no output to store"
        )
    try:
        charge = (
            row.amount_held
            if price is None
            else min(
                price.charge_for(
                    predict_time, input=row.input, metrics=metrics, stored_outputs=len(stored)
                ),
                row.amount_held,
            )
        )
    except ValueError:
        # The provider reported a time that is no time (negative, NaN, infinite), or the price
        # changed mid-run so that the input no longer fits its count: as if nothing had been
        # reported, the hold is charged. Raising here failed the whole batch's finalize.
        charge = row.amount_held
    ledger.capture(session, row.hold_id, charge, now=now)
    _finish(row, GenerationStatus.SUCCEEDED, None, None, now or utcnow())
    row.outputs = stored
    record = session.get(CreateAttempt, (row.id, row.attempt))
    if record is not None:
        record.outputs = stored
    row.amount_charged = charge
    session.flush()
    return row


def fail(
    session: Session,
    generation_id: int,
    *,
    code: str,
    message: str,
    status: str = GenerationStatus.FAILED,
    attempt: int | None = None,
    now: datetime | None = None,
) -> bool:
    """End the generation as ``failed`` (or ``canceled``) and refund its hold if still pending.

    Returns False, changing nothing, if the generation already ended: every refund path may call
    this for the same generation and exactly one refund happens (the row lock serializes them).
    With ``attempt``, a generation that moved on to another attempt (requeued) raises
    ``InvalidTransition``: a run of an earlier attempt must not end the new one.
    """
    if status not in UNSUCCESSFUL:
        raise ValueError(f"status must be 'failed' or 'canceled', got {status!r}")
    row = _lock(session, generation_id)
    _check_attempt(row, attempt)
    if row.is_terminal:
        return False
    if row.hold_id is not None:
        ledger.release_if_pending(session, row.hold_id, f"{code}: {message}", now=now)
    now = now or utcnow()
    _finish(row, status, code, message, now)
    record = session.get(CreateAttempt, (row.id, row.attempt))
    if record is not None and record.state in (AttemptState.CREATING, AttemptState.LOST):
        # Ended without a prediction: a prediction it may have started is an orphan now.
        record.state, record.state_at = AttemptState.ABANDONED, now
    session.flush()
    return True


class CannotCancel(InvalidTransition):
    """The generation cannot be canceled any more: it succeeded or failed already, or its
    prediction already succeeded at the provider (``finishing``: the run completes and charges
    it). ``status`` is the generation's status; nothing was written."""

    def __init__(self, row: Generation, *, finishing: bool = False) -> None:
        if finishing:
            message = (
                f"generation {row.id}'s prediction {row.prediction_id} already succeeded; the "
                "generation is being completed (and charged), so it is not canceled"
            )
        else:
            message = f"generation {row.id} already {row.status}; it is not canceled"
        super().__init__(message)
        self.generation_id = row.id
        self.status = row.status
        self.finishing = finishing


@dataclass(frozen=True)
class Cancellation:
    """What ``cancel`` did: the generation (canceled), whether this call canceled it (False: it
    was canceled before), and the prediction to cancel at the provider once committed."""

    row: Generation
    changed: bool
    prediction_id: str | None


def cancel(
    session: Session,
    generation_id: int,
    *,
    message: str = "canceled by request",
    provider_succeeded: Collection[str] = (),
    now: datetime | None = None,
) -> Cancellation:
    """Cancel the generation at an application's request, under its row lock.

    - ``pending``, ``queued`` or ``running``: ``canceled`` (code ``canceled_by_request``) and
      its hold released, in the caller's transaction (``fail`` with status canceled: an attempt
      whose create is in flight is abandoned, so its late answer is canceled and a lost one's
      prediction is an orphan the sweeps cancel). The run notices at its next step; the caller
      cancels ``prediction_id`` at the provider after the commit.
    - ``canceled`` already: nothing changes (``changed`` False): a repeated cancel is answered
      as the first one was.
    - ``succeeded`` or ``failed``: ``CannotCancel`` with the status, nothing written.
    - ``running`` with a prediction that already succeeded at the provider (the webhook
      receiver recorded it, or the caller saw it: ``provider_succeeded`` holds its id):
      ``CannotCancel`` (``finishing``): the work is done and paid, so the run stores it and
      charges it. A cancel that wins the race against the provider's success instead discards
      that output: nothing is charged for it, and finalize deletes what it stored.
    """
    row = _lock(session, generation_id)
    if row.status == GenerationStatus.CANCELED:
        return Cancellation(row, False, row.prediction_id)
    if row.status in TERMINAL:
        raise CannotCancel(row)
    if (
        row.status == GenerationStatus.RUNNING
        and row.prediction_id is not None
        and (
            row.prediction_id in provider_succeeded
            or _prediction_succeeded(session, row.prediction_id)
        )
    ):
        raise CannotCancel(row, finishing=True)
    fail(
        session,
        generation_id,
        code=CANCELED_BY_REQUEST,
        message=message,
        status=GenerationStatus.CANCELED,
        now=now,
    )
    return Cancellation(row, True, row.prediction_id)


def _prediction_succeeded(session: Session, prediction_id: str) -> bool:
    """Whether the webhook receiver recorded the prediction's success."""
    status = session.scalar(
        sa.select(PredictionState.status).where(PredictionState.prediction_id == prediction_id)
    )
    return status == PredictionStatus.SUCCEEDED


def requeue(session: Session, generation_id: int, *, include_succeeded: bool = False) -> Generation:
    """Send a failed or canceled generation back to ``pending`` as a new attempt (``attempt + 1``).

    The old attempt's run, prediction, hold and error are cleared from the row (its money is
    settled: the ledger keeps its entries). With ``include_succeeded`` a succeeded generation may
    be regenerated too; its old charge stays, the new attempt is charged again.
    """
    row = _lock(session, generation_id)
    allowed = (*UNSUCCESSFUL, GenerationStatus.SUCCEEDED) if include_succeeded else UNSUCCESSFUL
    if row.status not in allowed:
        raise InvalidTransition(
            f"generation {generation_id} is {row.status}; only {' or '.join(allowed)} "
            "generations can be requeued"
        )
    if row.hold_id is not None:
        # Settled already by fail/succeed; this only guards against a hand-edited row.
        ledger.release_if_pending(session, row.hold_id, "requeued")
    row.status = GenerationStatus.PENDING
    row.attempt += 1
    row.pending_since = utcnow()  # the new attempt waits from now (aging)
    for field in (
        "batch_key",
        "dagster_run_id",
        "prediction_id",
        "prediction_model",
        "prediction_version",
        "hold_id",
        "outputs",
        "error_code",
        "error_message",
        "queued_at",
        "started_at",
        "finished_at",
    ):
        setattr(row, field, None)
    row.amount_held = 0
    row.amount_charged = 0
    # The old attempt's cost stays on its create_attempts row.
    row.provider_cost_nusd = None
    session.flush()
    return row


# --- reading and checking ---------------------------------------------------------------------


def as_dict(row: Generation) -> dict[str, Any]:
    """The row as a JSON-ready dict (timestamps in ISO 8601 UTC)."""
    out: dict[str, Any] = {}
    for column in Generation.__table__.columns:
        value = getattr(row, column.key)
        out[column.key] = value.isoformat() if isinstance(value, datetime) else value
    return out


def verify(session: Session) -> list[ledger.Violation]:
    """Check that generations and their holds agree (complements ``ledger.verify``).

    - a succeeded generation's hold is captured for exactly ``amount_charged``;
    - a failed or canceled generation's hold is not pending (its refund happened);
    - a running generation has a hold, and the hold belongs to it;
    - no generation has more than one pending hold.
    """
    return list(_verify(session))


def _verify(session: Session) -> Iterator[ledger.Violation]:
    rows = session.execute(
        sa.select(
            Generation.id,
            Generation.status,
            Generation.hold_id,
            Generation.amount_charged,
            Hold.status,
            Hold.captured_amount,
            Hold.generation_id,
        )
        .outerjoin(Hold, Hold.id == Generation.hold_id)
        .where(Generation.status.in_((GenerationStatus.RUNNING, *TERMINAL)))
        .order_by(Generation.id)
        .execution_options(yield_per=1000)
    )
    for gid, status, hold_id, charged, hold_status, captured, hold_gid in rows:
        subject = f"generation {gid}"
        if hold_id is not None and hold_gid != gid:
            yield ledger.Violation(
                subject, f"its hold {hold_id} belongs to generation {hold_gid}", hold_id=hold_id
            )
        if status == GenerationStatus.SUCCEEDED and (
            hold_status != HoldStatus.CAPTURED or captured != charged
        ):
            yield ledger.Violation(
                subject,
                f"succeeded with {charged} charged but its hold {hold_id} is "
                f"{hold_status or 'missing'} with {captured} captured",
                hold_id=hold_id,
            )
        if status in UNSUCCESSFUL and hold_status == HoldStatus.PENDING:
            yield ledger.Violation(
                subject, f"{status} but its hold {hold_id} is still pending", hold_id=hold_id
            )
        if status == GenerationStatus.RUNNING and hold_id is None:
            yield ledger.Violation(subject, "running without a hold")
    doubles = session.execute(
        sa.select(Hold.generation_id, sa.func.count())
        .where(Hold.status == HoldStatus.PENDING, Hold.generation_id.is_not(None))
        .group_by(Hold.generation_id)
        .having(sa.func.count() > 1)
    )
    for doubled, count in doubles:
        yield ledger.Violation(
            f"generation {doubled}", f"has {count} pending holds, expected at most 1"
        )
