"""``GET /metrics``: Prometheus metrics (``api/metrics.py``), in the text format or OpenMetrics
as the scraper asks. Like ``/healthz`` it needs no key: serve it on an internal network only
(the proxy in front of the service should not route it)."""

from __future__ import annotations

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Request, Response
from prometheus_client.exposition import choose_encoder

from ai_handler_dagster.api import deps
from ai_handler_dagster.api.metrics import registry_for_scrape

router = APIRouter(tags=["health"])


@router.get(
    "/metrics",
    summary="Prometheus metrics (no key: keep it on an internal network)",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "the metrics"}},
)
def metrics(request: Request, engine: sa.Engine = Depends(deps.engine)) -> Response:  # noqa: B008
    encoder, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encoder(registry_for_scrape(engine)), media_type=content_type)
