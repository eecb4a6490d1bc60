"""``POST /webhooks/replicate``: Replicate's signed webhooks, on the same service as the API.

No API key: the Standard Webhooks signature is the authentication. The work is the
transport-free ``webhooks.receiver.handle`` (size, signature and timestamp with the
``standardwebhooks`` package, body shape, then one transaction that deduplicates by
``webhook-id`` and never moves a prediction's state backwards); this module maps its answer to
HTTP and counts it.

Answers: 204 for an accepted, duplicate or out-of-order delivery (Replicate must stop retrying
each of them); otherwise a problem: 401 bad signature or stale timestamp, 400 not a prediction,
413 over ``receiver.MAX_BODY_BYTES`` (bodies over the app's own limit are refused before this
route, by ``limits.BodyLimits``), 500 the database failed (Replicate retries), 503 when
``AI_HANDLER_WEBHOOK_SECRET`` is unset or malformed: the route never accepts an unsigned
delivery, and Replicate keeps retrying until the operator sets the secret. Every answer of this
route is counted in ``ai_handler_webhook_deliveries_total{outcome=...}``.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request, Response
from prometheus_client import Counter
from starlette.concurrency import run_in_threadpool

from ai_handler_dagster.api import deps
from ai_handler_dagster.api.problems import (
    BODY_TOO_LARGE,
    INTERNAL,
    Problem,
    ProblemType,
    problem_type,
)
from ai_handler_dagster.settings import ConfigError
from ai_handler_dagster.webhooks.config import SECRET_VAR, webhook_secret
from ai_handler_dagster.webhooks.receiver import MAX_BODY_BYTES, WEBHOOK_PATH, handle

log = logging.getLogger(__name__)
router = APIRouter(tags=["webhooks"])

#: Deliveries answered, by ``outcome``: ``accepted``, ``duplicate``, ``out_of_order`` (204), or
#: ``refused_<status>`` (``refused_401``, ``refused_400``, ``refused_413``, ``refused_500``,
#: ``refused_503``).
DELIVERIES = Counter(
    "ai_handler_webhook_deliveries_total",
    "Replicate webhook deliveries answered by POST /webhooks/replicate, by outcome",
    ["outcome"],
)

WEBHOOK_UNVERIFIED = problem_type(
    "webhook-unverified",
    401,
    "The webhook's signature does not verify",
    "A delivery needs webhook-id, webhook-timestamp and webhook-signature (Standard Webhooks) "
    "signed with the account's secret (AI_HANDLER_WEBHOOK_SECRET), and a timestamp within 5 "
    "minutes of the service's clock. Nothing was recorded.",
)
WEBHOOK_MALFORMED = problem_type(
    "webhook-malformed",
    400,
    "The webhook's body is not a prediction",
    "A delivery's body must be a UTF-8 JSON object with a prediction 'id' and 'status', and its "
    "webhook-id at most 255 characters. Nothing was recorded.",
)
WEBHOOKS_NOT_CONFIGURED = problem_type(
    "webhooks-not-configured",
    503,
    "Webhooks are not configured on this service",
    "The service has no valid signing secret (AI_HANDLER_WEBHOOK_SECRET), so it cannot verify "
    "deliveries and accepts none. The sender retries; set the secret and restart the service.",
)

_KINDS: dict[int, ProblemType] = {
    401: WEBHOOK_UNVERIFIED,
    400: WEBHOOK_MALFORMED,
    413: BODY_TOO_LARGE,
    500: INTERNAL,
}


@router.post(
    WEBHOOK_PATH,
    status_code=204,
    summary="Receive a Replicate webhook (Standard Webhooks signature, no API key)",
    response_class=Response,
    responses={
        204: {"description": "recorded (or a duplicate or out-of-order event: nothing to retry)"},
        400: {"description": "the body is not a prediction JSON"},
        401: {"description": "the signature or timestamp does not verify"},
        413: {"description": f"the body is over {MAX_BODY_BYTES} bytes"},
        500: {"description": "the database failed; the sender retries"},
        503: {"description": "no signing secret is configured; nothing is accepted"},
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    },
)
async def replicate_webhook(request: Request) -> Response:
    try:
        secret = webhook_secret()
    except ConfigError as exc:
        DELIVERIES.labels(outcome="refused_503").inc()
        log.warning("refused a webhook: %s", exc)
        raise Problem(
            WEBHOOKS_NOT_CONFIGURED, f"webhooks are not configured: {exc}", variable=SECRET_VAR
        ) from None
    # The body is already in memory (limits.BodyLimits read it); the database work runs in the
    # threadpool like every other route's.
    body = await request.body()
    answer = await run_in_threadpool(handle, deps.engine_of(request), request.headers, body, secret)
    DELIVERIES.labels(outcome=answer.outcome).inc()
    if answer.status == 204:
        return Response(status_code=204)
    if answer.status != 500:
        log.info("refused a webhook: %d %s", answer.status, answer.message)
    raise Problem(_KINDS[answer.status], answer.message)
