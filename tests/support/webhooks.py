"""Webhooks in tests: signed deliveries, what the receiver stored, and a recording receiver."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from ai_handler_dagster.db.models import PredictionState, WebhookDelivery
from ai_handler_dagster.devstack.emulator import sign_webhook

#: A secret in Replicate's format (``whsec_`` + base64 of 24 bytes).
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def prediction(pid: str = "p1", status: str = "succeeded", **fields: Any) -> dict[str, Any]:
    """A prediction JSON as Replicate sends it (the fields the tests look at)."""
    doc: dict[str, Any] = {
        "id": pid,
        "model": "demo/pixel-sketch",
        "version": "v" * 64,
        "status": status,
        "input": {"prompt": "a fox"},
        "output": [f"https://replicate.delivery/{pid}/0.png"] if status == "succeeded" else None,
        "error": None,
        "logs": "",
        "metrics": {"predict_time": 1.5} if status == "succeeded" else {},
        "urls": {"get": f"https://api.replicate.com/v1/predictions/{pid}"},
        "created_at": "2026-01-01T00:00:00.000000Z",
    }
    doc.update(fields)
    return doc


def signed(
    body: bytes | dict[str, Any],
    *,
    msg_id: str = "msg_1",
    timestamp: int | None = None,
    secret: str = SECRET,
) -> tuple[dict[str, str], bytes]:
    """Headers and body of a delivery signed the way the emulator (and Replicate) sign."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    ts = int(time.time()) if timestamp is None else timestamp
    headers = {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": sign_webhook(secret, msg_id, ts, raw),
    }
    return headers, raw


def table_rows(engine: sa.Engine) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Every row of both webhook tables, for "nothing changed" assertions."""
    with engine.connect() as conn:
        deliveries = conn.execute(
            sa.select(WebhookDelivery.webhook_id, WebhookDelivery.prediction_id).order_by(
                WebhookDelivery.webhook_id
            )
        ).all()
        states = conn.execute(
            sa.select(
                PredictionState.prediction_id, PredictionState.status, PredictionState.payload
            ).order_by(PredictionState.prediction_id)
        ).all()
    return [tuple(r) for r in deliveries], [tuple(r) for r in states]


def state_of(engine: sa.Engine, pid: str) -> tuple[str, dict[str, Any]] | None:
    """``(status, payload)`` recorded for ``pid``."""
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(PredictionState.status, PredictionState.payload).where(
                PredictionState.prediction_id == pid
            )
        ).one_or_none()
    return None if row is None else (row.status, row.payload)


@dataclass
class Received:
    """One request the webhook receiver got."""

    headers: dict[str, str]
    body: str
    at: float

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class WebhookReceiver:
    """A real HTTP server recording POSTs; answers each with the next of ``statuses``."""

    url: str
    received: list[Received] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def wait_for(self, predicate: Callable[[list[Received]], bool], timeout: float = 5.0) -> None:
        """Block until ``predicate(received)`` holds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if predicate(list(self.received)):
                    return
            time.sleep(0.01)
        raise AssertionError(f"webhooks not received in time; got {len(self.received)}")
