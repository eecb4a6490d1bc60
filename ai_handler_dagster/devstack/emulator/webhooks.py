"""Signed webhook delivery (Standard Webhooks, as Replicate sends them).

Deliveries run on a small pool of worker threads so the API never waits for a receiver. Each
prediction always goes to the same worker, so its events arrive in the order they happened
unless a delivery has to be retried. A retry keeps the event's ``webhook-id`` (receivers
deduplicate on it) but is signed afresh with a new ``webhook-timestamp``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import queue
import secrets
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from .config import EmulatorConfig
from .scheduler import Scheduler

log = logging.getLogger(__name__)

WEBHOOK_EVENTS = frozenset({"start", "output", "logs", "completed"})


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: ``v1,`` + base64 HMAC-SHA256 of ``id.timestamp.body``.

    The key is the base64-decoded part of the ``whsec_`` secret.
    """
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def new_message_id() -> str:
    """A fresh ``msg_...`` id for one event (kept across that event's retries)."""
    return "msg_" + secrets.token_urlsafe(18)


@dataclass
class _Delivery:
    url: str
    event: str
    prediction_id: str
    msg_id: str
    body: bytes
    attempt: int = 0


_STOP = object()


class WebhookDispatcher:
    """Queues webhook events and delivers them with retries, off the request threads."""

    def __init__(self, config: Callable[[], EmulatorConfig], scheduler: Scheduler) -> None:
        self._config = config
        self._scheduler = scheduler
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._history: dict[str, list[dict[str, Any]]] = {}
        self._client: httpx.Client | None = None
        workers = config().webhook_workers
        self._queues: list[queue.Queue[Any]] = [queue.Queue() for _ in range(workers)]
        self._threads = [
            threading.Thread(
                target=self._work, args=(q,), name=f"emulator-webhook-{i}", daemon=True
            )
            for i, q in enumerate(self._queues)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, url: str, event: str, prediction_id: str, body: bytes) -> str:
        """Queue one event for ``url``; returns its ``webhook-id``."""
        delivery = _Delivery(url, event, prediction_id, new_message_id(), body)
        with self._lock:
            self._counts["queued"] += 1
        self._enqueue(delivery)
        return delivery.msg_id

    def stats(self) -> dict[str, int]:
        """Counters: queued, attempts, delivered, retried, failed (gave up)."""
        with self._lock:
            counts = dict(self._counts)
        for key in ("queued", "attempts", "delivered", "retried", "failed"):
            counts.setdefault(key, 0)
        counts["pending"] = counts["queued"] - counts["delivered"] - counts["failed"]
        return counts

    def history(self, prediction_id: str) -> list[dict[str, Any]]:
        """Every delivery attempt made for one prediction (event, webhook-id, status...)."""
        with self._lock:
            return list(self._history.get(prediction_id, ()))

    def stop(self) -> None:
        """Stop the workers; queued deliveries are dropped."""
        for q in self._queues:
            q.put(_STOP)
        for thread in self._threads:
            thread.join(timeout=5)
        with self._lock:
            if self._client is not None:
                self._client.close()

    def _enqueue(self, delivery: _Delivery) -> None:
        # Same prediction, same worker: keeps start/output/completed in order.
        index = zlib.crc32(delivery.prediction_id.encode()) % len(self._queues)
        self._queues[index].put(delivery)

    def _http(self) -> httpx.Client:
        # One client shared by the workers (httpx clients are thread-safe), made on the first
        # delivery: building one loads the CA bundle, a cost an emulator without webhooks
        # should not pay at every start. trust_env=False: a proxy from the environment must
        # not swallow local webhooks.
        with self._lock:
            if self._client is None:
                self._client = httpx.Client(trust_env=False, follow_redirects=False)
            return self._client

    def _work(self, inbox: queue.Queue[Any]) -> None:
        while True:
            item = inbox.get()
            if item is _STOP:
                return
            self._attempt(self._http(), item)

    def _attempt(self, client: httpx.Client, delivery: _Delivery) -> None:
        config = self._config()
        delivery.attempt += 1
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "user-agent": "replicate-emulator-webhook/1.0",
            "webhook-id": delivery.msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(
                config.signing_secret, delivery.msg_id, timestamp, delivery.body
            ),
        }
        status: int | None = None
        error: str | None = None
        try:
            response = client.post(
                delivery.url,
                content=delivery.body,
                headers=headers,
                timeout=config.webhook_timeout_s,
            )
            status = response.status_code
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        ok = status is not None and 200 <= status < 300
        record = {
            "event": delivery.event,
            "webhook_id": delivery.msg_id,
            "attempt": delivery.attempt,
            "status_code": status,
            "error": error,
            "url": delivery.url,
        }
        with self._lock:
            self._counts["attempts"] += 1
            self._history.setdefault(delivery.prediction_id, []).append(record)
            if ok:
                self._counts["delivered"] += 1
            elif delivery.attempt >= config.webhook_max_attempts:
                self._counts["failed"] += 1
            else:
                self._counts["retried"] += 1
        if ok or delivery.attempt >= config.webhook_max_attempts:
            if not ok:
                log.warning(
                    "webhook %s to %s gave up: %s", delivery.event, delivery.url, error or status
                )
            return
        delay = config.webhook_retry_delay_s * (2 ** (delivery.attempt - 1))
        self._scheduler.call_later(delay, lambda: self._enqueue(delivery))
