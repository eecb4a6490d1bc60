"""The webhook receiver: verify Replicate's signed webhooks and record what they report.

Replicate signs webhooks per Standard Webhooks: ``webhook-id``, ``webhook-timestamp`` (epoch
seconds) and ``webhook-signature`` (space-separated ``v1,<base64>`` entries, several while a
secret rotates), each an HMAC-SHA256 keyed by the base64-decoded part of the ``whsec_`` secret
over ``"{id}.{timestamp}.{body}"``.

Three layers, each usable alone:

- :func:`verify`: the signature and the timestamp tolerance (a captured delivery replayed later
  is refused; within the tolerance the ``webhook-id`` deduplication catches it).
- :func:`handle`: one delivery, transport-free: size, signature, body shape, then one short
  transaction (``store.record_delivery``). Returns ``(status_code, message)``.
- :func:`start_receiver` / :func:`serve`: a ``ThreadingHTTPServer`` answering
  ``POST /webhooks/replicate`` and ``GET /healthz``.

Answers: 204 accepted (also for a duplicate or an out-of-order event: Replicate must stop
retrying them), 401 bad signature or stale timestamp, 413 body over the limit (refused from
``Content-Length`` before reading it), 400 not a prediction JSON, 500 the database failed (so
Replicate retries). A refused request changes nothing. The secret is never logged.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from ai_handler_dagster.db.engine import make_engine
from ai_handler_dagster.errors import AiHandlerError
from ai_handler_dagster.http_server import BodyTooLarge, LocalHTTPServer, TrackedHandler
from ai_handler_dagster.webhooks.store import record_delivery

log = logging.getLogger(__name__)

#: The route Replicate posts to (give ``<receiver url>/webhooks/replicate`` as ``webhook``).
WEBHOOK_PATH = "/webhooks/replicate"
HEALTH_PATH = "/healthz"
#: Largest accepted body. A prediction JSON is a few KiB (outputs are URLs), logs included.
MAX_BODY_BYTES = 1024 * 1024
#: How far ``webhook-timestamp`` may be from our clock, either way (Standard Webhooks' default).
DEFAULT_TOLERANCE_S = 300

_PREDICTION_ID = re.compile(r"[0-9A-Za-z_-]{1,255}")
_STATUS = re.compile(r"[a-z_]{1,32}")
_MAX_WEBHOOK_ID = 255


class WebhookVerificationError(AiHandlerError):
    """A delivery whose signature or timestamp does not verify (answered 401)."""


def decode_secret(secret: str | bytes) -> bytes:
    """The HMAC key of a ``whsec_<base64>`` secret (bytes are taken as the key itself).

    Raises:
        ValueError: the secret is empty or not base64.
    """
    if isinstance(secret, bytes):
        key = secret
    else:
        try:
            key = base64.b64decode(secret.strip().removeprefix("whsec_"), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("the webhook secret is not 'whsec_' followed by base64") from None
    if not key:
        raise ValueError("the webhook secret is empty")
    return key


def _lower_keys(headers: Mapping[str, str] | Any) -> dict[str, str]:
    # HTTP header names are case-insensitive; plain dicts (tests, other frameworks) are not.
    return {str(k).lower(): str(v) for k, v in headers.items()}


def verify(
    headers: Mapping[str, str] | Any,
    body: bytes,
    secret: str | bytes,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> str:
    """Check a delivery's Standard Webhooks signature and timestamp; return its ``webhook-id``.

    ``headers`` is any mapping with ``items()`` (names in any case); ``secret`` is the
    ``whsec_...`` string (or the decoded key). The timestamp must be within ``tolerance_s`` of
    ``now`` (default: the clock) in both directions. Any ``v1`` entry of ``webhook-signature``
    may match; entries of other versions are ignored. Comparisons are constant-time.

    Raises:
        WebhookVerificationError: missing headers, a timestamp out of tolerance, no matching
            signature.
    """
    found = _lower_keys(headers)
    msg_id = found.get("webhook-id", "")
    timestamp = found.get("webhook-timestamp", "").strip()
    signatures = found.get("webhook-signature", "")
    if not msg_id or not timestamp or not signatures:
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature")
    if not timestamp.isdigit() or len(timestamp) > 15:
        raise WebhookVerificationError("webhook-timestamp is not epoch seconds")
    current = time.time() if now is None else now
    sent = int(timestamp)
    if sent < current - tolerance_s:
        raise WebhookVerificationError("webhook-timestamp is too old")
    if sent > current + tolerance_s:
        raise WebhookVerificationError("webhook-timestamp is too far in the future")
    key = decode_secret(secret)
    expected = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    matched = False
    for entry in signatures.split():
        version, _, encoded = entry.partition(",")
        if version != "v1":
            continue
        try:
            given = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            continue
        # No early exit: every entry is compared, in constant time each.
        matched |= hmac.compare_digest(given, expected)
    if not matched:
        raise WebhookVerificationError("no webhook-signature matches")
    return msg_id


def _reject_constant(name: str) -> Any:
    # NaN and Infinity are not JSON; PostgreSQL would refuse to store them.
    raise ValueError(f"{name} is not valid JSON")


def parse_prediction(body: bytes) -> dict[str, Any]:
    """The prediction object of a webhook body.

    Raises:
        ValueError: not UTF-8 JSON, not an object, or without a usable ``id`` and ``status``.
    """
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("body is not a JSON object")
    prediction_id = data.get("id")
    status = data.get("status")
    if not isinstance(prediction_id, str) or not _PREDICTION_ID.fullmatch(prediction_id):
        raise ValueError("body has no valid prediction id")
    if not isinstance(status, str) or not _STATUS.fullmatch(status):
        raise ValueError("body has no valid prediction status")
    return data


def handle(
    engine: sa.Engine,
    headers: Mapping[str, str] | Any,
    body: bytes,
    secret: str | bytes,
    *,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> tuple[int, str]:
    """Process one webhook delivery; returns ``(status_code, message)`` for the HTTP answer.

    Order: size (413), signature and timestamp (401), body (400), then one transaction that
    records the ``webhook-id`` and upserts the prediction state (204, message ``accepted``,
    ``out_of_order`` or ``duplicate``). A database failure is 500 so the sender retries. Only
    the 204 path writes anything.
    """
    if len(body) > MAX_BODY_BYTES:
        return 413, "body too large"
    try:
        msg_id = verify(headers, body, secret, tolerance_s=tolerance_s, now=now)
    except WebhookVerificationError as exc:
        return 401, str(exc)
    if len(msg_id) > _MAX_WEBHOOK_ID:
        return 400, "webhook-id is too long"
    try:
        prediction = parse_prediction(body)
    except ValueError as exc:
        return 400, str(exc)
    try:
        outcome = record_delivery(engine, msg_id, prediction)
    except sa.exc.SQLAlchemyError as exc:
        # The class only: a driver message could quote the payload.
        log.error("could not record webhook %s: %s", msg_id, type(exc).__name__)
        return 500, "database error"
    log.debug("webhook %s for %s: %s", msg_id, prediction["id"], outcome)
    return 204, outcome


# --------------------------------------------------------------------------------------------
# HTTP server


class _Server(LocalHTTPServer):
    def __init__(
        self,
        address: tuple[str, int],
        engine: sa.Engine,
        secret: bytes,
        tolerance_s: float,
        max_body_bytes: int,
    ) -> None:
        self.engine = engine
        self.secret = secret
        self.tolerance_s = tolerance_s
        self.max_body_bytes = max_body_bytes
        self.counts: Counter[str] = Counter()
        super().__init__(address, _Handler)

    def count(self, key: str) -> None:
        with self.lock:
            self.counts[key] += 1

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver prints a traceback to stderr by default. A sender hanging up (or our own
        # stop() cutting a connection) is routine; anything else is a bug worth a logged trace.
        # Either way the sender got no 2xx and will retry.
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | TimeoutError):
            log.debug("connection from %s ended: %s", client_address, type(exc).__name__)
            return
        log.exception("unexpected error serving a webhook from %s", client_address)


class _Handler(TrackedHandler):
    server_version = "ai-handler-webhooks/1.0"
    logger = log
    server: _Server

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != HEALTH_PATH:
            self._answer(404, "not found")
            return
        with self.server.lock:
            counts = dict(self.server.counts)
        self._answer(200, json.dumps({"status": "ok", "deliveries": counts}), "application/json")

    def do_POST(self) -> None:
        if self.path.split("?", 1)[0] != WEBHOOK_PATH:
            self.close_connection = True  # the body was not read
            self._answer(404, "not found")
            return
        try:
            body = self.read_body(self.server.max_body_bytes)
        except BodyTooLarge:
            self.server.count("413")
            # The rest of the body is never read, so the connection cannot carry another request.
            self.close_connection = True
            self._answer(413, "body too large")
            return
        except ValueError as exc:
            self.server.count("400")
            self.close_connection = True
            self._answer(400, str(exc))
            return
        status, message = handle(
            self.server.engine,
            self.headers,
            body,
            self.server.secret,
            tolerance_s=self.server.tolerance_s,
        )
        self.server.count(message if status == 204 else str(status))
        if status != 204:
            log.info("refused webhook from %s: %d %s", self.address_string(), status, message)
        self._answer(status, message)

    def _answer(self, status: int, message: str, content_type: str = "text/plain") -> None:
        body = b"" if status == 204 else message.encode()
        self.send_response(status)
        if status != 204:
            self.send_header("Content-Type", f"{content_type}; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if body:
            self.wfile.write(body)


class ReceiverHandle:
    """A running receiver: where it listens, its counters, and ``stop()``."""

    def __init__(self, server: _Server, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self._stopped = False
        address = server.server_address
        self.host: str = str(address[0])
        self.port: int = int(address[1])
        shown = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        if ":" in shown:
            shown = f"[{shown}]"
        self.url = f"http://{shown}:{self.port}"
        """``http://host:port`` of the receiver."""

    @property
    def webhook_url(self) -> str:
        """The URL to give Replicate as ``webhook`` (``<url>/webhooks/replicate``)."""
        return self.url + WEBHOOK_PATH

    def stats(self) -> dict[str, int]:
        """Deliveries answered so far: ``accepted``, ``out_of_order``, ``duplicate``, and
        refusals by status code (``"401"``, ``"413"``, ...)."""
        with self._server.lock:
            return dict(self._server.counts)

    def stop(self) -> None:
        """Stop serving and release the port; safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        self._server.shutdown()
        self._server.server_close()
        self._server.close_connections()
        self._thread.join(timeout=5)

    def __enter__(self) -> ReceiverHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"ReceiverHandle({self.url})"


def start_receiver(
    engine_url: str | sa.URL | sa.Engine | None,
    secret: str | bytes,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> ReceiverHandle:
    """Serve webhooks on ``host:port`` (0: any free port) in a background thread.

    ``engine_url`` is the app database (an engine, a URL, or None for
    ``AI_HANDLER_DATABASE_URL``); it must be migrated. A malformed ``secret`` fails here, not
    at the first delivery.
    """
    key = decode_secret(secret)
    engine = engine_url if isinstance(engine_url, sa.Engine) else make_engine(engine_url)
    server = _Server((host, port), engine, key, tolerance_s, max_body_bytes)
    thread = threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": 0.1},
        name="webhook-receiver",
        daemon=True,
    )
    thread.start()
    return ReceiverHandle(server, thread)


def write_port_file(path: Path, port: int) -> None:
    """Write ``port`` to ``path`` atomically, so a reader never sees half a number."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(str(port))
    tmp.replace(path)


def serve(
    host: str,
    port: int,
    engine_url: str | sa.URL | sa.Engine | None,
    secret: str | bytes,
    *,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    port_file: Path | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Serve in the foreground until ``stop`` is set (or KeyboardInterrupt).

    With ``port_file`` the bound port is written there once connections are accepted.
    """
    handle = start_receiver(engine_url, secret, host=host, port=port, tolerance_s=tolerance_s)
    try:
        if port_file is not None:
            write_port_file(port_file, handle.port)
        log.info("webhook receiver listening on %s", handle.webhook_url)
        (stop or threading.Event()).wait()
    except KeyboardInterrupt:
        pass
    finally:
        handle.stop()
