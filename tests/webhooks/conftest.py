"""Fixtures for the webhook tests: a migrated app database per dialect (emptied per test),
signed deliveries, and live receivers."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from ai_handler_dagster.db.models import PredictionState, WebhookDelivery
from ai_handler_dagster.devstack.emulator import sign_webhook
from ai_handler_dagster.webhooks import ReceiverHandle, start_receiver
from tests.db import support

#: A secret in Replicate's format (``whsec_`` + base64 of 24 bytes).
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """One migrated database per dialect for the module (see tests/db/support.py)."""
    with support.migrated_database(request) as url:
        yield url


@pytest.fixture
def engine(db_url: str) -> sa.Engine:
    """The module's database with empty tables."""
    return support.emptied(db_url)


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


@pytest.fixture
def make_receiver() -> Iterator[Callable[..., ReceiverHandle]]:
    """Start receivers (stopped at teardown)."""
    handles: list[ReceiverHandle] = []

    def make(engine: sa.Engine, secret: str = SECRET, **kwargs: Any) -> ReceiverHandle:
        handle = start_receiver(engine, secret, **kwargs)
        handles.append(handle)
        return handle

    yield make
    for handle in handles:
        handle.stop()
