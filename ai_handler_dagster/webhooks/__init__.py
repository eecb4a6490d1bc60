"""Replicate webhooks: a receiver that records prediction states, and lookups that read them.

Polling hundreds of predictions exceeds Replicate's request budget (about 3000 non-create
requests a minute). Instead each create names the receiver as its ``webhook``; the receiver
verifies the Standard Webhooks signature, ignores duplicates by ``webhook-id`` and records the
prediction in ``prediction_states``; the await step reads that table through a lookup and polls
only slowly, as a fallback.

- ``receiver``: ``verify``, ``handle``, ``start_receiver``, ``serve``.
- ``store``: the deduplicating, monotonic writes (one transaction per delivery) and ``prune``.
- ``lookup``: ``make_lookup`` / ``make_batched_lookup`` for ``replicate.waiting.wait_many``
  (imported from its module: it needs Dagster, the receiver process does not).
- ``config``: ``AI_HANDLER_WEBHOOK_SECRET``, ``AI_HANDLER_WEBHOOK_URL``, ``fetch_secret``.
- ``commands``: ``ai-handler webhooks serve|prune``; ``python -m ai_handler_dagster.webhooks``.
"""

from ai_handler_dagster.webhooks.receiver import (
    DEFAULT_TOLERANCE_S,
    MAX_BODY_BYTES,
    WEBHOOK_PATH,
    ReceiverHandle,
    WebhookVerificationError,
    handle,
    serve,
    start_receiver,
    verify,
)
from ai_handler_dagster.webhooks.store import prune, record_delivery

__all__ = [
    "DEFAULT_TOLERANCE_S",
    "MAX_BODY_BYTES",
    "WEBHOOK_PATH",
    "ReceiverHandle",
    "WebhookVerificationError",
    "handle",
    "prune",
    "record_delivery",
    "serve",
    "start_receiver",
    "verify",
]
