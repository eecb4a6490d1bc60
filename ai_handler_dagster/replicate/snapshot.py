"""Predictions as immutable snapshots, and the error a finished one stands for.

The client's ``Prediction`` model (pydantic v1, client 1.0.7) drops ``data_removed`` and rejects
statuses newer than the client (``aborted``); both decide what happens to money, so a snapshot is
built from the raw JSON of an answer or a webhook, and keeps it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ai_handler_dagster import errors
from ai_handler_dagster.domain import PREDICTION_TERMINAL, PredictionStatus
from ai_handler_dagster.errors import GenerationError
from ai_handler_dagster.replicate.failures import _error_text, _truncate


@dataclass(frozen=True)
class PredictionSnapshot:
    """An immutable view of one prediction at one moment, as the API (or a webhook) showed it.

    ``raw`` is the JSON object exactly as received, for storage and for fields not modelled here.
    ``deadline_exceeded`` is set only by :func:`~ai_handler_dagster.replicate.waiting.wait_many`:
    the prediction ran past the caller's deadline and was canceled by us; its ``status`` is then
    ``canceled`` (even if the provider had not finished canceling yet) and :func:`snapshot_error`
    reports ``deadline_exceeded`` rather than ``prediction_canceled``.

    ``unreadable`` is set only by ``wait_many`` too: the provider's answers about this one
    prediction could not be used (unknown id, an answer that is not a prediction); the snapshot
    is ``failed`` and :func:`snapshot_error` reports that error.
    """

    id: str
    status: str
    model: str | None
    version: str | None
    output: Any
    error: str | None
    metrics: Mapping[str, Any]
    data_removed: bool
    urls: Mapping[str, str]
    created_at: str | None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)
    deadline_exceeded: bool = False
    unreadable: GenerationError | None = field(default=None, compare=False)

    @classmethod
    def unreadable_as(cls, prediction_id: str, error: GenerationError) -> PredictionSnapshot:
        """A ``failed`` stand-in for a prediction whose state cannot be read (see above)."""
        return cls(
            id=prediction_id,
            status=PredictionStatus.FAILED,
            model=None,
            version=None,
            output=None,
            error=error.message,
            metrics={},
            data_removed=False,
            urls={},
            created_at=None,
            unreadable=error,
        )

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PredictionSnapshot:
        """Build a snapshot from a prediction JSON object (API response or webhook payload)."""
        if not data.get("id") or not data.get("status"):
            raise GenerationError(
                errors.INTERNAL_ERROR, "prediction JSON without id or status from the provider"
            )
        return cls(
            id=str(data["id"]),
            status=str(data["status"]),
            model=data.get("model"),
            version=data.get("version"),
            output=data.get("output"),
            error=_error_text(data.get("error")),
            metrics=dict(data.get("metrics") or {}),
            data_removed=bool(data.get("data_removed", False)),
            urls=dict(data.get("urls") or {}),
            created_at=data.get("created_at"),
            raw=dict(data),
        )

    @property
    def is_terminal(self) -> bool:
        """True once the prediction can no longer change (succeeded, failed, canceled, aborted)."""
        return self.status in PREDICTION_TERMINAL

    @property
    def predict_time(self) -> float | None:
        """Seconds of model time billed by the provider (``metrics.predict_time``), if known."""
        value = self.metrics.get("predict_time")
        return float(value) if isinstance(value, int | float) else None

    @property
    def ended_at_provider(self) -> bool:
        """True when the provider itself reported this prediction ended (its answer's own
        ``status`` is terminal). False for the answer to our cancel at a deadline, which
        ``wait_many`` reports as ``canceled`` while the provider may still be canceling it: its
        metrics are not final yet."""
        return self.raw.get("status") in PREDICTION_TERMINAL

    @property
    def never_started(self) -> bool:
        """True when the provider says this ended prediction never ran: terminal, not
        succeeded, with ``started_at`` present and null (an answer without the field says
        nothing)."""
        return (
            self.is_terminal
            and self.status != PredictionStatus.SUCCEEDED
            and "started_at" in self.raw
            and self.raw["started_at"] is None
        )

    @property
    def web_url(self) -> str | None:
        """The provider's page for this prediction (``urls.web``), if it gave one."""
        return self.urls.get("web")


def snapshot_error(snapshot: PredictionSnapshot) -> GenerationError | None:
    """The error a terminal snapshot stands for, or ``None`` if it is usable (or still running).

    ``deadline_exceeded`` (our cancel at the deadline) wins over the plain canceled status; a
    succeeded prediction whose outputs the provider already deleted is ``output_expired``.
    """
    if snapshot.unreadable is not None:
        return snapshot.unreadable
    if snapshot.deadline_exceeded:
        return GenerationError(
            errors.DEADLINE_EXCEEDED,
            f"prediction {snapshot.id} ran past its deadline and was canceled",
        )
    if snapshot.status == PredictionStatus.FAILED:
        detail = _truncate(snapshot.error or "no error message")
        return GenerationError(
            errors.PREDICTION_FAILED, f"prediction {snapshot.id} failed: {detail}"
        )
    if snapshot.status in (PredictionStatus.CANCELED, PredictionStatus.ABORTED):
        return GenerationError(
            errors.PREDICTION_CANCELED, f"prediction {snapshot.id} was {snapshot.status}"
        )
    if snapshot.status == PredictionStatus.SUCCEEDED and snapshot.data_removed:
        return GenerationError(
            errors.OUTPUT_EXPIRED,
            f"prediction {snapshot.id} succeeded but the provider already removed its output",
        )
    return None


def parse_time(value: Any) -> float | None:
    """Epoch seconds of an RFC 3339 timestamp (any number of fraction digits), or None."""
    if not isinstance(value, str) or not value:
        return None
    text = value.strip().replace("Z", "+00:00").replace("z", "+00:00")
    # Python 3.11 accepts at most microseconds; providers may send nanoseconds.
    text = re.sub(r"(\.\d{6})\d+", r"\1", text)
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return None
    return parsed.timestamp()
