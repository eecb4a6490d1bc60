"""Replicate's webhooks, transport-free: verify one delivery and record what it reports.

Replicate signs webhooks per Standard Webhooks: ``webhook-id``, ``webhook-timestamp`` (epoch
seconds) and ``webhook-signature`` (space-separated ``v1,<base64>`` entries, several while a
secret rotates), an HMAC-SHA256 keyed by the ``whsec_`` secret over ``"{id}.{timestamp}.{body}"``.
The check is the ``standardwebhooks`` package's (the reference implementation of the standard):
any ``v1`` entry may match, compared in constant time, and the timestamp must be within
:data:`TOLERANCE_S` of the clock either way, so a captured delivery replayed later is refused;
within the tolerance the ``webhook-id`` deduplication of ``store.record_delivery`` catches it.

- :func:`verify`: the signature and the timestamp; returns the ``webhook-id``.
- :func:`parse_prediction`: the prediction object of a body.
- :func:`handle`: one delivery: size, signature, body shape, then one short transaction.

The HTTP side is the service's: ``POST /webhooks/replicate`` of ``ai-handler serve``
(``api/routes/webhooks.py``). Answers: 204 accepted (also for a duplicate or an out-of-order
event: Replicate must stop retrying them), 401 bad signature or stale timestamp, 413 body over
:data:`MAX_BODY_BYTES`, 400 not a prediction JSON, 500 the database failed (so Replicate
retries). A refused delivery changes nothing. The secret is never logged.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import sqlalchemy as sa
import standardwebhooks

from ai_handler_dagster.errors import AiHandlerError
from ai_handler_dagster.webhooks.store import Outcome, record_delivery

log = logging.getLogger(__name__)

#: The route Replicate posts to (give ``<service url>/webhooks/replicate`` as ``webhook``).
WEBHOOK_PATH = "/webhooks/replicate"
#: Largest accepted body. A prediction JSON is a few KiB (outputs are URLs), logs included.
MAX_BODY_BYTES = 1024 * 1024
#: How far ``webhook-timestamp`` may be from the clock, either way: Standard Webhooks' five
#: minutes, fixed in the ``standardwebhooks`` package (a test pins it).
TOLERANCE_S = 300

_PREDICTION_ID = re.compile(r"[0-9A-Za-z_-]{1,255}")
_STATUS = re.compile(r"[a-z_]{1,32}")
_MAX_WEBHOOK_ID = 255


class WebhookVerificationError(AiHandlerError):
    """A delivery whose signature or timestamp does not verify (answered 401)."""


@functools.lru_cache(maxsize=4)
def _verifier(secret: str | bytes) -> standardwebhooks.Webhook:
    return standardwebhooks.Webhook(secret)


def verify(headers: Mapping[str, str] | Any, body: bytes, secret: str | bytes) -> str:
    """Check a delivery's Standard Webhooks signature and timestamp; return its ``webhook-id``.

    ``headers`` is any mapping with ``items()`` (names in any case); ``secret`` is the
    ``whsec_...`` string (``webhooks.config.webhook_secret`` checks its form) or the raw key.

    Raises:
        WebhookVerificationError: missing or malformed headers, a timestamp out of tolerance,
            no matching signature.
        ValueError: the body is not UTF-8 (the signed content is text).
    """
    found = {str(k).lower(): str(v) for k, v in headers.items()}
    text = body.decode("utf-8")  # UnicodeDecodeError is a ValueError
    try:
        _verifier(secret).verify(text, found, json_parse=False)
    except standardwebhooks.WebhookVerificationError as exc:
        raise WebhookVerificationError(str(exc)) from None
    except ValueError:
        # A signature entry without its comma, or not base64.
        raise WebhookVerificationError("webhook-signature is malformed") from None
    return found["webhook-id"]


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
    except RecursionError:
        # A signed body can still be nested deeper than the decoder recurses: a bad body (400),
        # not a failure of ours that Replicate would retry for ever.
        raise ValueError("body is nested too deeply") from None
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


class Answer(NamedTuple):
    """What to answer a delivery: the HTTP status and, for 204, the store's outcome
    (``accepted``, ``out_of_order``, ``duplicate``), else why it was refused."""

    status: int
    message: str

    @property
    def outcome(self) -> str:
        """The delivery's label in metrics: the store's outcome, or ``refused_<status>``."""
        return self.message if self.status == 204 else f"refused_{self.status}"


def handle(
    engine: sa.Engine, headers: Mapping[str, str] | Any, body: bytes, secret: str | bytes
) -> Answer:
    """Process one webhook delivery.

    Order: size (413), UTF-8 (400: the signature is over text), signature and timestamp (401),
    body (400), then one transaction that records the ``webhook-id`` and upserts the prediction
    state (204). A database failure is 500 so the sender retries. Only the 204 path writes.
    """
    if len(body) > MAX_BODY_BYTES:
        return Answer(413, f"the body is over {MAX_BODY_BYTES} bytes")
    try:
        msg_id = verify(headers, body, secret)
    except WebhookVerificationError as exc:
        return Answer(401, str(exc))
    except ValueError:
        return Answer(400, "body is not JSON: not UTF-8")
    if len(msg_id) > _MAX_WEBHOOK_ID:
        return Answer(400, "webhook-id is too long")
    try:
        prediction = parse_prediction(body)
    except ValueError as exc:
        return Answer(400, str(exc))
    try:
        outcome: Outcome = record_delivery(engine, msg_id, prediction)
    except sa.exc.SQLAlchemyError as exc:
        # The class only: a driver message could quote the payload.
        log.error("could not record webhook %s: %s", msg_id, type(exc).__name__)
        return Answer(500, "database error")
    log.debug("webhook %s for %s: %s", msg_id, prediction["id"], outcome)
    return Answer(204, outcome)
