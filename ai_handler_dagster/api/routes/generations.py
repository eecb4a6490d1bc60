"""``POST /v1/generations`` (submit), ``GET /v1/generations/{id}`` (status) and ``GET
/v1/generations`` (a cursor-paginated list, newest first).

A submit is ``generations.submissions`` in a batch with the worker's other submits (the
worker's submitter, ``api/batching.py``), each answered as ``generations.submit`` would answer
it, so the API refuses exactly what the Python API refuses, and nothing is written on a
refusal: the row, its hold, its ledger entry and its first event commit together or not at all.
Each refusal has its problem type (registered below); ``refusal()`` maps ``submit``'s exceptions
to them, and the quote route uses it too.

Before the submit, a backlog check sheds load: too many generations waiting (pending or queued)
for the user, or in all, is 429 with ``Retry-After``. Each count reads at most its limit's worth
of index entries, so the check costs the same however deep the queue is. It is a soft limit:
requests racing past it at the same moment can each be accepted, so the backlog may exceed it by
the number of concurrent submits. Rows applications insert with SQL are not limited by it.

``Idempotency-Key`` (optional) is stored as the generation's ``request_id``, namespaced by the
calling key (``key:<key id>:<Idempotency-Key>``): two API keys cannot collide, and the
unique index on ``request_id`` makes concurrent repeats safe (``submit`` returns the winner's
row or refuses another body). It lasts as long as the generation row, which is never deleted.
"""

from __future__ import annotations

import base64
import binascii
import logging
import threading
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session, defer

from ai_handler_dagster import generations as gens
from ai_handler_dagster import settings
from ai_handler_dagster.api import batching, deps, keys
from ai_handler_dagster.api.problems import INVALID_REQUEST, NOT_FOUND, Problem, problem_type
from ai_handler_dagster.db.engine import session_scope
from ai_handler_dagster.db.models import Generation, utcnow
from ai_handler_dagster.domain import (
    MAX_PRIORITY,
    MIN_PRIORITY,
    GenerationStatus,
)
from ai_handler_dagster.pricing import PriceBook
from ai_handler_dagster.storage.objects import StoredObject
from ai_handler_dagster.storage.s3 import S3OutputStore

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["generations"])

#: Largest id either database stores (64-bit); a larger one in a URL is simply unknown.
MAX_ID = 2**63 - 1
#: Letters, digits and ``. _ : ~ -``, so that ``key:<key id>:<it>`` fits ``request_id`` (255).
IDEMPOTENCY_KEY_PATTERN = r"^[A-Za-z0-9._:~-]{1,200}$"
#: Seconds a worker's reading of everyone's backlog stays good (``_GlobalBacklog``).
GLOBAL_BACKLOG_TTL_S = 1.0
#: What a backlog refusal asks the client to wait: about a few sensor ticks' worth of claims.
BACKLOG_RETRY_AFTER_S = 10
#: Statuses of a generation waiting for its run (what the backlog limit counts).
WAITING = gens.WAITING
#: ``submit``'s names for the request's parts, as the HTTP request names them.
_FIELDS = {"user_id": "user", "request_id": "header.idempotency-key"}

INSUFFICIENT_CREDITS = problem_type(
    "insufficient-credits",
    402,
    "The user cannot afford the request",
    "The user's available credits (balance minus what their other requests hold) do not cover "
    "the hold this request needs; 'available' and 'needed' say by how much. A user nobody has "
    "granted credits to has no account, and so 0 available. 402 Payment Required rather than "
    "403: the request is allowed, the user only has to pay for it, and 403 stays for what no "
    "payment changes (a scope, a priority). Nothing was written or held.",
)
UNKNOWN_MODEL = problem_type(
    "unknown-model",
    404,
    "The model has no price",
    "The model reference is well formed but the price table has no entry for it, so it cannot "
    "run here (GET /v1/models lists the priced models). Nothing was written.",
)
PRIORITY_NOT_ALLOWED = problem_type(
    "priority-not-allowed",
    403,
    "The priority is above what the user or the key may ask for",
    "A priority in range but above the user's ceiling (set by the operator with `ai-handler "
    "priority set`) or the API key's max_priority. Ask for a lower one, or none (the highest "
    "allowed). Nothing was written.",
)
IDEMPOTENCY_CONFLICT = problem_type(
    "idempotency-conflict",
    409,
    "The Idempotency-Key was used for another request",
    "This API key already sent this Idempotency-Key with a different body (user, model, input "
    "or priority); 'generation' is the id of the first request's generation. The same key with "
    "the same body answers the first request's 202 again. Nothing was written.",
)
BACKLOG_FULL = problem_type(
    "backlog-full",
    429,
    "Too many generations are waiting",
    "The user has AI_HANDLER_API_MAX_BACKLOG_PER_USER generations waiting (pending or queued), "
    "or all users together AI_HANDLER_API_MAX_BACKLOG. Retry after the seconds of Retry-After; "
    "'scope' says which limit ('user' or 'global'). Nothing was written.",
)


# --- bodies and answers -------------------------------------------------------------------------


class SubmitBody(BaseModel):
    """A generation request."""

    model_config = ConfigDict(extra="forbid", strict=True)

    user: str = Field(description="The application's user id; their credits pay the hold.")
    model: str = Field(
        description="'owner/name', 'owner/name:version' or 'deployment:owner/name' (priced)."
    )
    input: dict[str, Any] = Field(description="The model's input, a JSON object.")
    priority: int | None = Field(
        default=None,
        description=f"{MIN_PRIORITY} (lowest) to {MAX_PRIORITY}; at most what the user's tier "
        "and the API key allow. Default: the highest allowed.",
    )


class Links(BaseModel):
    self: str = Field(description="This generation.")
    cancel: str = Field(description="POST here to cancel it.")
    events: str = Field(description="Its state changes as Server-Sent Events.")


class Accepted(BaseModel):
    """A submitted generation."""

    id: int
    status: GenerationStatus = Field(description="Its current status ('pending' when new).")
    links: Links


class Output(BaseModel):
    """One stored output, with a presigned link that expires."""

    index: int
    url: str = Field(description="A presigned GET link to the object.")
    expires_at: datetime = Field(description="When the link stops working.")
    content_type: str
    size: int = Field(description="Bytes.")
    sha256: str


class Credits(BaseModel):
    held: int = Field(description="The hold of the current attempt (0 before it is placed).")
    charged: int = Field(description="What the attempt was charged (0 unless it succeeded).")


class GenerationView(BaseModel):
    """A generation as the API shows it."""

    id: int
    user: str
    model: str
    status: GenerationStatus
    attempt: int
    priority: int
    credits: Credits
    error_code: str | None
    error_message: str | None
    created_at: datetime
    queued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    outputs: list[Output] | None = Field(
        default=None, description="Stored outputs (GET /v1/generations/{id} only)."
    )
    output_count: int = Field(description="How many outputs are stored.")
    links: Links


class PageLinks(BaseModel):
    next: str | None = Field(description="The next page, or null on the last one.")


class GenerationPage(BaseModel):
    """A page of generations, newest first."""

    items: list[GenerationView]
    next_cursor: str | None = Field(description="Pass as 'cursor' for the next page.")
    links: PageLinks


# --- refusals -----------------------------------------------------------------------------------


def _invalid(field: str, message: str) -> Problem:
    return Problem(
        INVALID_REQUEST, f"{field}: {message}", errors=[{"field": field, "message": message}]
    )


def refusal(
    exc: gens.InvalidRequest, *, prices: PriceBook, model: str, input: dict[str, Any]
) -> Problem:
    """The problem that answers one of ``submit``'s refusals (the quote's too)."""
    if isinstance(exc, gens.CannotAfford):
        return Problem(INSUFFICIENT_CREDITS, str(exc), available=exc.available, needed=exc.needed)
    if isinstance(exc, gens.UnknownUser):
        # submit checked the model and the input before the account, so the price is known.
        price = prices.find(model)
        needed = price.hold_amount(input) if price is not None else None
        return Problem(
            INSUFFICIENT_CREDITS,
            f"{exc}; 0 credits are available",
            available=0,
            needed=needed,
        )
    if isinstance(exc, gens.UnknownModel):
        return Problem(UNKNOWN_MODEL, str(exc), model=model)
    if isinstance(exc, gens.PriorityNotAllowed):
        return Problem(PRIORITY_NOT_ALLOWED, str(exc))
    if isinstance(exc, gens.TooManyWaiting):
        return _backlog_full("user", str(exc), exc.limit)
    field = _FIELDS.get(exc.field or "", exc.field or "body")
    return _invalid(field, str(exc))


# --- submit -------------------------------------------------------------------------------------


def _capped_count(session: Session, query: sa.Select[Any], cap: int) -> int:
    return int(session.connection().execute(query, {"cap": cap}).scalar() or 0)


# Counting a capped subquery reads at most ``cap`` index entries, however many rows match.
_WAITING = sa.select(sa.func.count()).select_from(
    sa.select(Generation.id)
    .where(Generation.status.in_(WAITING))
    .limit(sa.bindparam("cap", type_=sa.Integer))
    .subquery()
)


class _GlobalBacklog:
    """Everyone's waiting generations, as this worker estimates them.

    Counting them for every submit reads up to the limit's worth of index entries (10,000 by
    default) per request, which under load costs more than the submit itself. So the count is
    read at most every ``GLOBAL_BACKLOG_TTL_S`` and, between reads, the worker adds what it
    accepted itself; an estimate at or over the limit is read again before anything is refused.
    Submits of other workers and rows inserted with SQL are seen at the next read: the limit is
    soft by that much, as it is for racing submits anyway.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._read: dict[str, tuple[int, float]] = {}
        self._accepted: dict[str, int] = {}

    @staticmethod
    def _key(session: Session) -> str:
        return session.get_bind().engine.url.render_as_string(hide_password=True)

    def waiting(self, session: Session, limit: int) -> int:
        key, now = self._key(session), time.monotonic()
        with self._lock:
            read = self._read.get(key)
            if read is not None and now - read[1] < GLOBAL_BACKLOG_TTL_S:
                estimate = read[0] + self._accepted.get(key, 0)
                if estimate < limit:
                    return estimate
        count = _capped_count(session, _WAITING, limit)
        with self._lock:
            self._read[key], self._accepted[key] = (count, now), 0
        return count

    def accepted(self, session: Session, count: int = 1) -> None:
        key = self._key(session)
        with self._lock:
            self._accepted[key] = self._accepted.get(key, 0) + count


_GLOBAL = _GlobalBacklog()


def _backlog_full(scope: str, why: str, limit: int) -> Problem:
    return Problem(
        BACKLOG_FULL,
        f"{why}; retry in {BACKLOG_RETRY_AFTER_S} s",
        headers={"Retry-After": str(BACKLOG_RETRY_AFTER_S)},
        scope=scope,
        limit=limit,
    )


def _links(generation_id: int) -> Links:
    here = f"/v1/generations/{generation_id}"
    return Links(self=here, cancel=f"{here}/cancel", events=f"{here}/events")


def _generations_of(session: Session, request_ids: Sequence[str]) -> list[str]:
    """Which of ``request_ids`` a generation has (the unique index answers)."""
    found = sa.select(Generation.request_id).where(Generation.request_id.in_(request_ids))
    return [str(request_id) for request_id in session.scalars(found)]


@router.post(
    "/generations",
    status_code=202,
    summary="Submit a generation",
    response_model=Accepted,
    responses={
        402: {"description": "the user cannot afford the hold"},
        403: {"description": "the key lacks the scope, or the priority is not allowed"},
        404: {"description": "the model has no price"},
        409: {"description": "the Idempotency-Key was used for another body"},
        422: {"description": "the body is malformed ('errors' names the fields)"},
        429: {"description": "too many requests, or too many generations waiting"},
    },
)
async def submit_generation(
    body: SubmitBody,
    request: Request,
    response: Response,
    caller: keys.Caller = Depends(deps.require(keys.SUBMIT)),  # noqa: B008
    prices: PriceBook = Depends(deps.prices),  # noqa: B008
    idempotency_key: str | None = Header(
        default=None,
        pattern=IDEMPOTENCY_KEY_PATTERN,
        description="Repeat a request safely: this key with the same body answers the first "
        "202 again (with 'Idempotent-Replayed: true'); with another body 409. Scoped to the "
        "API key; kept as long as the generation.",
    ),
) -> Accepted:
    request_id = f"key:{caller.key_id}:{idempotency_key}" if idempotency_key else None
    submit: batching.Batcher[gens.SubmitRequest, batching.Submitted]
    submit = request.app.state.submitter
    try:
        done = await submit(
            gens.SubmitRequest(
                user_id=body.user,
                model=body.model,
                input=body.input,
                request_id=request_id,
                priority=body.priority,
                max_priority=caller.max_priority,
            )
        )
    except gens.RequestConflict as exc:
        raise Problem(
            IDEMPOTENCY_CONFLICT,
            f"Idempotency-Key {idempotency_key!r} was already used by this API key for "
            f"generation {exc.generation_id} with a different user, model, input or priority",
            generation=exc.generation_id,
        ) from None
    except gens.InvalidRequest as exc:
        raise refusal(exc, prices=prices, model=body.model, input=body.input) from None
    answer = Accepted(id=done.id, status=GenerationStatus(done.status), links=_links(done.id))
    response.headers["Location"] = answer.links.self
    if not done.created:
        response.headers["Idempotent-Replayed"] = "true"
    return answer


def batch_submitter(
    engine: sa.Engine, prices: PriceBook
) -> batching.Batcher[gens.SubmitRequest, batching.Submitted]:
    """The worker's submitter (``api/batching.py``): its batches are ``gens.submissions``
    behind the global backlog check, with the per-user backlog limit."""

    def run(session: Session, requests: Sequence[gens.SubmitRequest]) -> list[batching.Answer]:
        answers: list[batching.Answer | None] = [None] * len(requests)
        total = settings.api_max_backlog()
        if _GLOBAL.waiting(session, total) >= total:
            # A repeat writes nothing, so a full backlog does not refuse it.
            repeats = [r.request_id for r in requests if r.request_id is not None]
            known = set(_generations_of(session, repeats)) if repeats else set()
            for i, submitted in enumerate(requests):
                if submitted.request_id not in known:
                    answers[i] = _backlog_full("global", f"{total} generations are waiting", total)
        allowed = [i for i, answer in enumerate(answers) if answer is None]
        results = gens.submissions(
            session,
            [requests[i] for i in allowed],
            prices=prices,
            max_waiting=settings.api_max_backlog_per_user(),
        )
        created = 0
        for i, result in zip(allowed, results, strict=True):
            if isinstance(result, gens.Submission):
                row = result.generation
                answers[i] = batching.Submitted(row.id, row.status, result.created)
                created += result.created
            else:
                answers[i] = result
        _GLOBAL.accepted(session, created)
        done = [answer for answer in answers if answer is not None]
        assert len(done) == len(requests)  # every request was answered
        return done

    return batching.submitter(engine, run)


# --- reading ------------------------------------------------------------------------------------

_store_lock = threading.Lock()


def _output_store(request: Request) -> S3OutputStore:
    """The outputs IO manager's store, configured from the settings the code location's
    resources read (``definitions.build_resources``), made once per worker: its presigned links
    are the ones the Dagster UI's output metadata shows."""
    state = request.app.state
    store: S3OutputStore | None = getattr(state, "output_store", None)
    if store is None:
        with _store_lock:
            store = getattr(state, "output_store", None)
            if store is None:
                # Dagster is imported only when a generation with outputs is first read.
                from dagster_aws.s3 import S3Resource

                from ai_handler_dagster.storage.io_manager import GenerationOutputsIOManager

                s3 = S3Resource(
                    endpoint_url=settings.s3_endpoint_url(), region_name=settings.s3_region()
                )
                store = GenerationOutputsIOManager(s3=s3, bucket=settings.s3_bucket()).store()
                state.output_store = store
    return store


def outputs_of(request: Request, row: Generation) -> list[Output]:
    if not row.outputs:
        return []
    store = _output_store(request)
    ttl = settings.api_output_link_ttl_s()
    expires = utcnow() + timedelta(seconds=ttl)
    out = []
    for index, item in enumerate(row.outputs):
        try:
            obj = StoredObject.from_json(item)
        except (KeyError, TypeError, ValueError):
            log.warning("generation %s has a malformed output record at %d", row.id, index)
            continue
        # Each object is signed in the bucket it was written to (the setting may have moved on).
        bucket = S3OutputStore(store.client, obj.bucket, presign_client=store.presign_client)
        out.append(
            Output(
                index=index,
                url=bucket.presign(obj.key, ttl),
                expires_at=expires,
                content_type=obj.content_type,
                size=obj.size,
                sha256=obj.sha256,
            )
        )
    return out


def _view(row: Generation, outputs: list[Output] | None = None) -> GenerationView:
    return GenerationView(
        id=row.id,
        user=row.user_id,
        model=row.model,
        status=GenerationStatus(row.status),
        attempt=row.attempt,
        priority=row.priority,
        credits=Credits(held=row.amount_held, charged=row.amount_charged),
        error_code=row.error_code,
        error_message=row.error_message,
        created_at=row.created_at,
        queued_at=row.queued_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        outputs=outputs,
        output_count=len(row.outputs or []),
        links=_links(row.id),
    )


def shown_row(session: Session, generation_id: int) -> Generation | None:
    """The generation as the API shows it: its input is not read (nor decoded: a row written by
    hand may not hold JSON)."""
    return session.scalars(
        sa.select(Generation).where(Generation.id == generation_id).options(defer(Generation.input))
    ).first()


@router.get(
    "/generations/{generation_id}",
    summary="A generation: status, credits, error, outputs with expiring links",
    response_model=GenerationView,
    response_model_exclude_none=False,
    responses={404: {"description": "no generation has this id"}},
)
def read_generation(
    request: Request,
    generation_id: int = Path(ge=1, le=MAX_ID),
    reader: deps.Reader = Depends(deps.reader),  # noqa: B008
    engine: sa.Engine = Depends(deps.engine),  # noqa: B008
) -> GenerationView:
    with session_scope(engine) as session:
        row = shown_row(session, generation_id)
    if row is None:
        raise Problem(NOT_FOUND, f"no generation {generation_id}")
    reader.check_user(row.user_id)
    return _view(row, outputs_of(request, row))


def _encode_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(f"g{last_id}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        text = ""
    digits = text[1:]
    if not (text.startswith("g") and digits.isascii() and digits.isdigit()):
        raise _invalid("query.cursor", "not a cursor this service gave (pass next_cursor as is)")
    value = int(digits)
    if not 1 <= value <= MAX_ID:
        raise _invalid("query.cursor", "not a cursor this service gave (pass next_cursor as is)")
    return value


@router.get(
    "/generations",
    summary="Generations, newest first, a page at a time",
    response_model=GenerationPage,
)
def list_generations(
    user: str | None = Query(
        default=None, min_length=1, max_length=255, description="Only this user's."
    ),
    status: GenerationStatus | None = Query(  # noqa: B008
        default=None, description="Only generations in this status."
    ),
    cursor: str | None = Query(
        default=None, max_length=64, description="'next_cursor' of the previous page."
    ),
    limit: int = Query(default=50, ge=1, le=200, description="Items per page."),
    reader: deps.Reader = Depends(deps.reader),  # noqa: B008
    engine: sa.Engine = Depends(deps.engine),  # noqa: B008
) -> GenerationPage:
    if reader.user is not None:  # a user token lists its own user's only
        reader.check_user(user if user is not None else reader.user)
        user = reader.user
    # Newest first by id, resuming below the last id seen: rows submitted meanwhile get higher
    # ids and never shift a later page (no duplicates, no gaps). One range read of
    # ix_generations_user_id_id (a user), ix_generations_status_id (a status) or the primary key.
    query = sa.select(Generation).options(defer(Generation.input))
    if user is not None:
        query = query.where(Generation.user_id == user)
    if status is not None:
        query = query.where(Generation.status == status.value)
    if cursor is not None:
        query = query.where(Generation.id < _decode_cursor(cursor))
    with session_scope(engine) as session:
        rows = list(session.scalars(query.order_by(Generation.id.desc()).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = _encode_cursor(rows[-1].id) if more else None
    next_link = None
    if next_cursor is not None:
        params = {"user": user, "status": status.value if status else None, "limit": limit}
        kept = {k: v for k, v in params.items() if v is not None}
        next_link = "/v1/generations?" + urlencode({**kept, "cursor": next_cursor})
    return GenerationPage(
        items=[_view(r) for r in rows], next_cursor=next_cursor, links=PageLinks(next=next_link)
    )
