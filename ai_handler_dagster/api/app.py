"""The ASGI app of ``ai-handler serve``: ``create_app()`` (uvicorn calls it as a factory in each
worker).

Each worker has its own engine and price book; everything shared between workers and hosts
(keys, rate-limit counters, idempotency, the event log) lives in the app database. Errors are
problem details (``problems.py``): a refused request, a malformed body (422 with the offending
fields), an unknown route, and an unexpected failure (500, logged, nothing written) alike.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ai_handler_dagster import settings
from ai_handler_dagster.api import deps
from ai_handler_dagster.api.limits import BodyLimits, CatchAll
from ai_handler_dagster.api.metrics import RequestMetrics
from ai_handler_dagster.api.problems import (
    BODY_TOO_LARGE,
    FORBIDDEN_SCOPE,
    INTERNAL,
    INVALID_REQUEST,
    MEDIA_TYPE,
    METHOD_NOT_ALLOWED,
    NOT_FOUND,
    RATE_LIMITED,
    REQUEST_TIMEOUT,
    UNAUTHORIZED,
    Problem,
    ProblemType,
)
from ai_handler_dagster.api.routes.generations import batch_submitter
from ai_handler_dagster.api.server import ON_SHUTDOWN
from ai_handler_dagster.api.streams import Hub
from ai_handler_dagster.db.engine import make_counter_engine, make_engine
from ai_handler_dagster.pricing import PriceBook, load_pricing

log = logging.getLogger(__name__)

#: The route modules under ``api/routes``, each with a ``router``.
ROUTERS = (
    *("health", "key", "generations", "events", "tokens", "cancel", "models", "accounts"),
    "metrics",
    "webhooks",
)


def _version() -> str:
    try:
        return version("ai_handler_dagster")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0"


def _field(location: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(p) for p in location]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:] if parts[0] == "body" else parts
    return ".".join(parts) or "body"


async def _on_problem(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Problem)
    return exc.response(request.url.path)


async def _on_invalid(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"field": _field(e.get("loc", ())), "message": str(e.get("msg", "invalid"))}
        for e in exc.errors()
    ]
    first = errors[0] if errors else {"field": "body", "message": "invalid"}
    detail = f"{first['field']}: {first['message']}"
    return Problem(INVALID_REQUEST, detail, errors=errors).response(request.url.path)


async def _on_http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    kind: ProblemType
    if exc.status_code == 404:
        kind = NOT_FOUND
    elif exc.status_code == 405:
        kind = METHOD_NOT_ALLOWED
    elif exc.status_code == 400:
        kind = INVALID_REQUEST  # FastAPI's "error parsing the body" (not JSON, nested too deep)
    else:
        kind = ProblemType("http-error", exc.status_code, "HTTP error", "")
    detail = exc.detail if isinstance(exc.detail, str) else kind.title
    if kind is INVALID_REQUEST:
        return Problem(kind, detail, errors=[{"field": "body", "message": detail}]).response(
            request.url.path
        )
    return Problem(kind, detail, headers=dict(exc.headers or {})).response(request.url.path)


#: The problem details object every error answer is (``problems.Problem.body``).
PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "type": "object",
    "description": "RFC 9457 problem details; GET the `type` (a relative URI) for its meaning.",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string", "format": "uri-reference"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "instance": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["field", "message"],
                "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
            },
        },
    },
    "additionalProperties": True,
}
#: Answers any route may give (the body limits, a NUL or control character in the path or query,
#: an unexpected failure) and, for routes that take a key, the key's refusals.
_EVERY_ROUTE = {413: BODY_TOO_LARGE, 408: REQUEST_TIMEOUT, 422: INVALID_REQUEST, 500: INTERNAL}
_WITH_A_KEY = {401: UNAUTHORIZED, 403: FORBIDDEN_SCOPE, 429: RATE_LIMITED}


def _problem_response(description: str) -> dict[str, Any]:
    ref = {"$ref": "#/components/schemas/Problem"}
    return {"description": description, "content": {MEDIA_TYPE: {"schema": ref}}}


def _with_problems(document: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI document with every error answer as it is sent: problem details.

    FastAPI documents its 422 as ``application/json`` with its own validation schema, and knows
    nothing of the answers middleware and dependencies give; a route declares its own error
    statuses (``responses={404: {"description": ...}}``) and this gives each its body.
    """
    document.setdefault("components", {}).setdefault("schemas", {})["Problem"] = PROBLEM_SCHEMA
    for item in document.get("paths", {}).values():
        for operation in item.values():
            responses = operation.setdefault("responses", {})
            extra = dict(_EVERY_ROUTE)
            if operation.get("security"):
                extra.update(_WITH_A_KEY)
            for status, kind in extra.items():
                responses.setdefault(str(status), {"description": kind.title})
            for status, response in responses.items():
                if status.isdigit() and int(status) >= 400:
                    responses[status] = _problem_response(response.get("description", ""))
    schemas = document["components"]["schemas"]
    # FastAPI's own validation error schemas are never sent.
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    return document


def create_app(
    engine: sa.Engine | None = None,
    *,
    prices: PriceBook | None = None,
) -> FastAPI:
    """The API on ``engine`` (default: ``AI_HANDLER_DATABASE_URL``, which must be migrated) with
    ``prices`` (default: ``pricing.load_pricing()``, the table of ``AI_HANDLER_PRICING_FILE``)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        app.state.hub.start()
        # The server calls it as it shuts connections down (server.HeadDeadline.shutdown): open
        # event streams end then, instead of holding the shutdown until their clients leave.
        yield {ON_SHUTDOWN: app.state.hub.end_streams}
        await app.state.hub.close()
        app.state.submitter.close()
        app.state.admitter.close()
        if app.state.counter_engine is not app.state.engine:
            app.state.counter_engine.dispose()
        if owned:
            app.state.engine.dispose()

    # Every setting the routes read, read once now: a bad value stops the worker at start with
    # its message, instead of answering every request 500.
    for setting in (
        settings.api_rate_per_minute,
        settings.api_max_body_bytes,
        settings.api_body_timeout_s,
        settings.api_max_backlog_per_user,
        settings.api_max_backlog,
        settings.api_output_link_ttl_s,
        settings.api_events_poll_ms,
        settings.api_events_ping_s,
    ):
        setting()
    owned = engine is None
    app = FastAPI(
        title="ai_handler_dagster",
        version=_version(),
        summary="Paid AI generations: submit, follow, cancel; credits; Replicate's webhooks",
        lifespan=lifespan,
    )
    app.state.engine = engine if engine is not None else make_engine(settings.database_url())
    # Keys are checked and requests counted on their own connections (deps.require).
    app.state.counter_engine = make_counter_engine(app.state.engine)
    app.state.admitter = deps.admitter(app.state.counter_engine)
    app.state.prices = prices if prices is not None else load_pricing()
    # What wakes the worker's event streams (api/streams.py).
    app.state.hub = Hub(app.state.engine, poll_ms=settings.api_events_poll_ms())
    # The worker's submits share transactions (api/batching.py).
    app.state.submitter = batch_submitter(app.state.engine, app.state.prices)
    # Innermost: an unexpected failure is answered here; the middlewares around it see a 500.
    app.add_middleware(CatchAll)
    app.add_middleware(
        BodyLimits,
        max_bytes=settings.api_max_body_bytes(),
        timeout_s=settings.api_body_timeout_s(),
    )
    # Outermost: a request's duration includes reading its body and any refusal.
    app.add_middleware(RequestMetrics)
    app.add_exception_handler(Problem, _on_problem)
    app.add_exception_handler(RequestValidationError, _on_invalid)
    app.add_exception_handler(HTTPException, _on_http)
    for name in ROUTERS:
        module = importlib.import_module(f"ai_handler_dagster.api.routes.{name}")
        app.include_router(module.router)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _with_problems(FastAPI.openapi(app))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
