"""Prediction states recorded by the webhook route, as ``wait_many`` lookups.

``wait_many(client, ids, lookup=..., expect_webhooks=True)`` asks the lookup first and
yields a terminal state without any API request; the API is then polled only every
``poll_max_s`` as a fallback for a webhook that never came. Two shapes:

- :func:`make_lookup`: one primary-key query per call.
- :func:`make_batched_lookup`: one query for all watched predictions still running, at most
  every ``max_age_s``; answers from that result in between (hundreds of predictions, a handful
  of queries a second).

A lookup never raises: a database error or an unreadable row answers ``None`` (with a warning),
so waiting falls back to polling instead of failing the step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import dagster as dg
import sqlalchemy as sa

from ai_handler_dagster import errors
from ai_handler_dagster.db.models import PredictionState
from ai_handler_dagster.errors import GenerationError
from ai_handler_dagster.replicate.snapshot import PredictionSnapshot

Lookup = Callable[[str], PredictionSnapshot | None]

#: Ids per ``IN (...)`` list: far below every driver's parameter limit.
_CHUNK = 500


def _snapshot(prediction_id: str, payload: Any) -> PredictionSnapshot | None:
    try:
        if not isinstance(payload, dict):
            raise GenerationError(errors.INTERNAL_ERROR, "stored payload is not a JSON object")
        return PredictionSnapshot.from_json(payload)
    except GenerationError as err:
        dg.get_dagster_logger().warning(
            f"ignoring the webhook state of prediction {prediction_id}: {err.message}"
        )
        return None


def lookup_many(engine: sa.Engine, ids: Iterable[str]) -> dict[str, PredictionSnapshot]:
    """The recorded states of ``ids`` (those without one are absent), in one query per 500 ids.

    Raises:
        sqlalchemy.exc.SQLAlchemyError: the database could not be read.
    """
    wanted = list(dict.fromkeys(ids))
    found: dict[str, PredictionSnapshot] = {}
    with engine.connect() as conn:
        for start in range(0, len(wanted), _CHUNK):
            chunk = wanted[start : start + _CHUNK]
            rows = conn.execute(
                sa.select(PredictionState.prediction_id, PredictionState.payload).where(
                    PredictionState.prediction_id.in_(chunk)
                )
            )
            for prediction_id, payload in rows:
                snapshot = _snapshot(prediction_id, payload)
                if snapshot is not None:
                    found[prediction_id] = snapshot
    return found


def _read_one(engine: sa.Engine, prediction_id: str) -> PredictionSnapshot | None:
    try:
        return lookup_many(engine, [prediction_id]).get(prediction_id)
    except sa.exc.SQLAlchemyError as exc:
        dg.get_dagster_logger().warning(
            f"webhook states unreadable ({type(exc).__name__}); polling {prediction_id} instead"
        )
        return None


def make_lookup(engine: sa.Engine) -> Lookup:
    """``lookup(prediction_id)``: the state webhooks recorded for it, or ``None``."""

    def lookup(prediction_id: str) -> PredictionSnapshot | None:
        return _read_one(engine, prediction_id)

    return lookup


def make_batched_lookup(
    engine: sa.Engine, ids: Iterable[str], *, max_age_s: float = 0.25
) -> Lookup:
    """Like :func:`make_lookup`, reading every one of ``ids`` not yet terminal in one query.

    The query runs when a lookup finds its cached answer older than ``max_age_s``, so a webhook
    is noticed at most ``max_age_s`` after it landed (plus ``wait_many``'s own schedule).
    Terminal states are kept for good: they never change. An id outside ``ids`` is read on its
    own. Thread-safe.
    """
    watched = list(dict.fromkeys(ids))
    known: dict[str, PredictionSnapshot] = {}
    lock = threading.Lock()
    refreshed_at = float("-inf")

    def lookup(prediction_id: str) -> PredictionSnapshot | None:
        nonlocal refreshed_at
        with lock:
            cached = known.get(prediction_id)
            if cached is not None and cached.is_terminal:
                return cached
            if prediction_id not in watched_set:
                return _read_one(engine, prediction_id)
            if time.monotonic() - refreshed_at >= max_age_s:
                pending = [p for p in watched if not (p in known and known[p].is_terminal)]
                try:
                    known.update(lookup_many(engine, pending))
                except sa.exc.SQLAlchemyError as exc:
                    dg.get_dagster_logger().warning(
                        f"webhook states unreadable ({type(exc).__name__}); polling instead"
                    )
                # Also after an error: a database outage must not turn into a query storm.
                refreshed_at = time.monotonic()
            return known.get(prediction_id)

    watched_set = frozenset(watched)
    return lookup
