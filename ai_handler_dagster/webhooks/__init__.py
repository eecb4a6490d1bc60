"""Replicate webhooks: verify signed deliveries, record prediction states, and read them back.

Polling hundreds of predictions exceeds Replicate's request budget (about 3000 non-create
requests a minute). Instead each create names the service's ``POST /webhooks/replicate`` as its
``webhook``; the route verifies the Standard Webhooks signature, ignores duplicates by
``webhook-id`` and records the prediction in ``prediction_states``; the await step reads that
table through a lookup and polls only slowly, as a fallback.

- ``receiver``: ``verify``, ``parse_prediction``, ``handle`` (transport-free; the HTTP route is
  ``api/routes/webhooks.py`` on ``ai-handler serve``).
- ``store``: the deduplicating, monotonic writes (one transaction per delivery) and ``prune``.
- ``lookup``: ``make_lookup`` / ``make_batched_lookup`` for ``replicate.waiting.wait_many``
  (imported from its module: it needs Dagster, the service does not).
- ``config``: ``AI_HANDLER_WEBHOOK_SECRET``, ``AI_HANDLER_WEBHOOK_URL``, ``fetch_secret``.
- ``commands``: ``ai-handler webhooks prune``.
"""

from ai_handler_dagster.webhooks.receiver import (
    MAX_BODY_BYTES,
    TOLERANCE_S,
    WEBHOOK_PATH,
    Answer,
    WebhookVerificationError,
    handle,
    parse_prediction,
    verify,
)
from ai_handler_dagster.webhooks.store import prune, record_delivery

__all__ = [
    "MAX_BODY_BYTES",
    "TOLERANCE_S",
    "WEBHOOK_PATH",
    "Answer",
    "WebhookVerificationError",
    "handle",
    "parse_prediction",
    "prune",
    "record_delivery",
    "verify",
]
