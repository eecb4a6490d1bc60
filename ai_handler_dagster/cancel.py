"""Canceling a generation at an application's request: the one function the CLI
(``ai-handler cancel``) and the HTTP API (``POST /v1/generations/{id}/cancel``) both call.

:func:`cancel_generation` does the whole cancel:

1. For a running generation with a prediction, it asks whether that prediction already
   succeeded at the provider (the webhook receiver's record first, else one ``GET``): then the
   work is done and paid for, and the cancel is refused (``generations.CannotCancel``,
   ``finishing``): the run stores the outputs and charges them.
2. ``generations.cancel``: under the generation's row lock, ``canceled`` with its hold released,
   in one transaction. Every other ending (finalize, the failure hook, the refund sensors,
   reconciliation, an expired hold) takes the same lock and finds the generation ended, so
   exactly one ending happens whatever races with it.
3. After the commit, the prediction (if any) is canceled at the provider. Should that fail (the
   provider unreachable), the generation stays canceled and nothing is charged; the prediction
   ends at its ``Cancel-After`` deadline, and canceling again retries the provider's cancel.

A create still in flight when the cancel lands cannot leave a paid prediction behind: its
attempt is abandoned, so the create step cancels the prediction its answer names, sends no
further try, and a prediction whose answer was lost is an orphan that the step's sweep and
reconciliation cancel (``adoption.cancel_orphans``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from ai_handler_dagster import generations as gens
from ai_handler_dagster.db.engine import session_scope
from ai_handler_dagster.domain import GenerationStatus, PredictionStatus
from ai_handler_dagster.errors import GenerationError
from ai_handler_dagster.replicate.client import ReplicateClient, ReplicateSettings

log = logging.getLogger(__name__)

__all__ = ["CancelResult", "cancel_generation", "provider_client"]

#: What happened at the provider: nothing to cancel, canceled (or asked to: it is asynchronous),
#: not attempted (no client configured), or the cancel request failed.
NO_PREDICTION = "none"
REQUESTED = "requested"
NOT_ATTEMPTED = "not_attempted"
FAILED = "failed"


@dataclass(frozen=True)
class CancelResult:
    """The canceled generation (``generations.as_dict``), whether this call canceled it
    (``changed``; False: it was canceled before), and its prediction's cancel at the provider
    (``provider``: one of ``none``, ``requested``, ``not_attempted``, ``failed``)."""

    generation: dict[str, Any]
    changed: bool
    prediction_id: str | None
    provider: str


def provider_client(*, attempts: int = 2, timeout_s: float = 10.0) -> ReplicateClient | None:
    """A client from ``REPLICATE_API_TOKEN`` (and ``REPLICATE_BASE_URL``), read now; None
    without a token. Few, short tries: a person or an HTTP request is waiting."""
    token = os.environ.get("REPLICATE_API_TOKEN")
    if not token:
        return None
    options: dict[str, Any] = {
        "api_token": token,
        "request_attempts": attempts,
        "timeout_s": timeout_s,
    }
    base_url = os.environ.get("REPLICATE_BASE_URL")
    if base_url:
        options["base_url"] = base_url
    return ReplicateClient(ReplicateSettings(**options))


def _succeeded_at_provider(
    engine: sa.Engine, generation_id: int, client: ReplicateClient | None
) -> set[str]:
    """The running generation's prediction id if the provider says it succeeded (one GET;
    unreadable counts as not succeeded: the cancel then wins)."""
    with session_scope(engine) as session:
        row = gens.get(session, generation_id)
        status, prediction_id = row.status, row.prediction_id
    if client is None or status != GenerationStatus.RUNNING or prediction_id is None:
        return set()
    try:
        snapshot = client.get(prediction_id)
    except GenerationError as exc:
        log.warning("could not read prediction %s before canceling: %s", prediction_id, exc)
        return set()
    return {prediction_id} if snapshot.status == PredictionStatus.SUCCEEDED else set()


def cancel_generation(
    engine: sa.Engine,
    generation_id: int,
    *,
    client: ReplicateClient | None,
    message: str = "canceled by request",
) -> CancelResult:
    """Cancel the generation and its prediction (see the module docstring).

    Raises ``generations.UnknownGeneration`` for an unknown id and ``generations.CannotCancel``
    (with ``status``; nothing written) when it succeeded, failed, or its prediction already
    succeeded. A generation canceled before is answered again (``changed`` False), and its
    prediction's cancel is sent again, which is harmless and retries one that failed.
    """
    finished = _succeeded_at_provider(engine, generation_id, client)
    with session_scope(engine) as session:
        done = gens.cancel(session, generation_id, message=message, provider_succeeded=finished)
        generation = gens.as_dict(done.row)
    provider = NO_PREDICTION
    if done.prediction_id is not None:
        if client is None:
            provider = NOT_ATTEMPTED
        else:
            try:
                client.cancel(done.prediction_id)
                provider = REQUESTED
            except GenerationError as exc:
                log.warning("could not cancel prediction %s: %s", done.prediction_id, exc)
                provider = FAILED
    return CancelResult(generation, done.changed, done.prediction_id, provider)
