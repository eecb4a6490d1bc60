"""What routes depend on: the app's database engine and price book, and the calling key.

``require(scope)`` is the dependency of every authenticated route: it reads the bearer key,
checks it, counts the request against the key's per-minute limit (one statement on
PostgreSQL, ``ratelimit.admit``) and checks its scope. Missing, malformed, unknown or revoked
keys are 401; a key without the scope 403 (the request counts); over its limit 429 with
``Retry-After``.
"""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ai_handler_dagster import settings
from ai_handler_dagster.api import keys, ratelimit
from ai_handler_dagster.api.problems import FORBIDDEN_SCOPE, RATE_LIMITED, UNAUTHORIZED, Problem
from ai_handler_dagster.pricing import PriceBook

_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer aih_...`")


def engine_of(request: Request) -> sa.Engine:
    """The app database's engine (one per worker)."""
    value: sa.Engine = request.app.state.engine
    return value


# The dependencies are coroutines although they do no I/O: FastAPI runs a plain function
# dependency in its thread pool, a thread hop per request for reading an attribute.


async def engine(request: Request) -> sa.Engine:
    """The app database's engine (one per worker)."""
    return engine_of(request)


async def prices(request: Request) -> PriceBook:
    """The price book the worker loaded at start."""
    value: PriceBook = request.app.state.prices
    return value


def require(scope: str, *, any_scope: bool = False) -> Callable[..., keys.Caller]:
    """The dependency that admits a key with ``scope`` (``admin`` has every scope); with
    ``any_scope`` every valid key is admitted."""
    if scope not in keys.SCOPES:
        raise ValueError(f"unknown scope {scope!r}")

    def caller(
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),  # noqa: B008
    ) -> keys.Caller:
        challenge = {"WWW-Authenticate": 'Bearer realm="ai-handler"'}
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise Problem(
                UNAUTHORIZED, "no API key: send 'Authorization: Bearer <key>'", headers=challenge
            )
        # On the counter engine: the key's row and its count are read and written in one
        # autocommit statement on PostgreSQL, so the key's counter row, which all its requests
        # update, stays locked only while that statement runs.
        counter: sa.Engine = request.app.state.counter_engine
        with counter.connect() as connection:
            admission = ratelimit.admit(
                connection, credentials.credentials, default_limit=settings.api_rate_per_minute()
            )
            connection.commit()  # SQLite's transaction; nothing to do in autocommit
        found, verdict = admission.caller, admission.verdict
        if found is None or verdict is None:
            raise Problem(UNAUTHORIZED, "the API key is unknown or revoked", headers=challenge)
        if not any_scope and not found.has(scope):
            raise Problem(
                FORBIDDEN_SCOPE,
                f"the key {found.key_id} lacks the '{scope}' scope",
                required_scope=scope,
            )
        limit = verdict.limit
        if not verdict.allowed:
            raise Problem(
                RATE_LIMITED,
                f"the key {found.key_id} made more than {limit} requests this minute",
                headers={"Retry-After": str(verdict.retry_after_s)},
                limit_per_minute=limit,
            )
        request.state.caller = found
        return found

    return caller
