"""``GET /v1/generations/{id}/events``: a generation's state changes as Server-Sent Events.

One SSE event per row of the generation event log, in order, until the generation ends:
``id`` is the event's id, ``event`` its status (``pending``, ``queued``, ``running``,
``succeeded``, ``failed``, ``canceled``) and ``data`` a JSON object. The terminal event's data
also carries the outcome: the outputs with presigned links (``succeeded``), or the error and
``refunded`` (``failed``, ``canceled``: true when nothing was charged and the hold went back).
The stream then ends. A client that lost its connection sends ``Last-Event-ID`` (a browser's
``EventSource`` does so itself) and gets every event after that one, the terminal one included;
a ``Last-Event-ID`` that is not an event id (decimal digits) is refused with 422.

The stream sleeps between events: the worker's ``streams.Hub`` wakes it when its generation gets
an event (``LISTEN/NOTIFY`` on PostgreSQL, one poller per worker on SQLite); each wake is one
read of the events after the last one sent. An idle stream costs a keep-alive comment every
``AI_HANDLER_API_EVENTS_PING_S``. When the worker shuts down, the hub ends its streams: each ends
cleanly without a terminal event, and the client reconnects with ``Last-Event-ID``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Header, Path, Request, Response
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool

from ai_handler_dagster import settings
from ai_handler_dagster.api import deps
from ai_handler_dagster.api.problems import INVALID_REQUEST, NOT_FOUND, Problem
from ai_handler_dagster.api.routes.generations import MAX_ID, outputs_of, shown_row
from ai_handler_dagster.api.streams import Hub
from ai_handler_dagster.db.engine import session_scope
from ai_handler_dagster.db.models import Generation, GenerationEvent
from ai_handler_dagster.domain import TERMINAL, GenerationStatus

router = APIRouter(prefix="/v1", tags=["generations"])

#: Events read per wake; a longer history is sent in several reads.
_PAGE = 200
#: How long a browser waits before reconnecting a dropped stream (the SSE ``retry`` field).
_RETRY_MS = 2000


def _read(
    engine: sa.Engine, generation_id: int, after: int
) -> tuple[Generation | None, list[GenerationEvent]]:
    """The generation, then its events after ``after``. In this order: an ended generation's
    terminal event committed with its status, so the later read of events holds it."""
    with session_scope(engine) as session:
        row = shown_row(session, generation_id)
        events = list(
            session.scalars(
                sa.select(GenerationEvent)
                .where(GenerationEvent.generation_id == generation_id, GenerationEvent.id > after)
                .order_by(GenerationEvent.id)
                .limit(_PAGE)
            )
        )
        session.expunge_all()
    return row, events


def _data(event: GenerationEvent) -> dict[str, Any]:
    return {
        "id": event.id,
        "generation_id": event.generation_id,
        "attempt": event.attempt,
        "status": event.status,
        "error_code": event.error_code,
        "at": event.at.isoformat(),
    }


def _outcome(request: Request, row: Generation) -> dict[str, Any]:
    """What the terminal event adds: outputs, or the error and whether credits went back."""
    credits = {"held": row.amount_held, "charged": row.amount_charged}
    if row.status == GenerationStatus.SUCCEEDED:
        outputs = [o.model_dump(mode="json") for o in outputs_of(request, row)]
        return {"credits": credits, "outputs": outputs}
    return {
        "credits": credits,
        "error_code": row.error_code,
        "error_message": row.error_message,
        "refunded": row.amount_charged == 0,
    }


#: Why a ``Last-Event-ID`` is refused; the ids a stream sends are plain decimals.
_NOT_AN_EVENT_ID = f"not an event id (send the last one received: digits, at most {MAX_ID})"


def _last_event_id(value: str | None) -> int:
    """The event id to resume after (0: from the start), or a 422 problem.

    An id is a position in the event log, whose ids only grow, whichever generation it belongs
    to: the stream sends its generation's events after it. Only ASCII digits are an id (int()
    also takes "+5", "1_000" and other scripts' digits); one past ``MAX_ID`` is refused before
    it is converted (nor could SQLite bind it).
    """
    text = (value or "").strip()
    if not text:
        return 0
    digits = text.lstrip("0") or "0"
    if not (text.isascii() and text.isdigit()) or len(digits) > len(str(MAX_ID)):
        raise _not_an_event_id()
    parsed = int(digits)
    if parsed > MAX_ID:
        raise _not_an_event_id()
    return parsed


def _not_an_event_id() -> Problem:
    return Problem(
        INVALID_REQUEST,
        f"Last-Event-ID: {_NOT_AN_EVENT_ID}",
        errors=[{"field": "header.last-event-id", "message": _NOT_AN_EVENT_ID}],
    )


@router.get(
    "/generations/{generation_id}/events",
    summary="A generation's state changes, as Server-Sent Events, until it ends",
    response_class=EventSourceResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "The event stream."},
        204: {"description": "resumed after the last event of an ended generation"},
        404: {"description": "no generation has this id"},
        422: {"description": "Last-Event-ID is not an event id (or another parameter is invalid)"},
    },
)
async def generation_events(
    request: Request,
    generation_id: int = Path(ge=1, le=MAX_ID),
    last_event_id: str | None = Header(
        default=None,
        description=(
            "Resume after this event (sent by EventSource when it reconnects): the stream sends "
            "the events after it. Not an event id (digits only): 422."
        ),
    ),
    reader: deps.Reader = Depends(deps.reader),  # noqa: B008
    engine: sa.Engine = Depends(deps.engine),  # noqa: B008
) -> EventSourceResponse:
    after = _last_event_id(last_event_id)
    row, first = await run_in_threadpool(_read, engine, generation_id, after)
    if row is None:
        raise Problem(NOT_FOUND, f"no generation {generation_id}")
    reader.check_user(row.user_id)
    if row.status in TERMINAL and not first and after:
        # Resumed after its last event: 204 tells an EventSource to stop reconnecting.
        return Response(status_code=204)  # type: ignore[return-value]
    hub: Hub = request.app.state.hub

    async def stream() -> AsyncIterator[ServerSentEvent]:
        nonlocal after, row
        events = first
        with hub.subscribe(generation_id) as woken:
            # Events committed between the first read and the subscription woke nobody: read
            # once more after sending the first ones.
            woken.set()
            while True:
                for event in events:
                    data = _data(event)
                    newest = event is events[-1] and len(events) < _PAGE
                    ended = newest and row is not None and row.status in TERMINAL
                    if ended and row is not None and event.status == row.status:
                        data.update(_outcome(request, row))
                    yield ServerSentEvent(
                        data=json.dumps(data), event=event.status, id=str(event.id), retry=_RETRY_MS
                    )
                    after = event.id
                if row is None or (row.status in TERMINAL and len(events) < _PAGE):
                    return
                if len(events) < _PAGE:
                    await woken.wait()
                if hub.ending:
                    # The worker is shutting down: end the response cleanly (the client
                    # resumes with Last-Event-ID), or the server waits for this client to leave.
                    return
                woken.clear()
                row, events = await run_in_threadpool(_read, engine, generation_id, after)

    return EventSourceResponse(
        stream(),
        ping=settings.api_events_ping_s(),
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
