"""What routes depend on: the app's database engine and price book, and the calling key.

``require(scope)`` is the dependency of every authenticated route: it reads the bearer key,
checks it, counts the request against the key's per-minute limit and checks its scope. The
check and the count are the worker's ``admitter``'s: the keys presented meanwhile, checked and
counted together (one statement on PostgreSQL, ``ratelimit.admit_many``). Missing, malformed,
unknown or revoked keys are 401; a key without the scope 403 (the request counts); over its
limit 429 with ``Retry-After``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import sqlalchemy as sa
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ai_handler_dagster import settings
from ai_handler_dagster.api import batching, keys, ratelimit
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


def admitter(counter: sa.Engine) -> batching.Batcher[str, ratelimit.Admission]:
    """The worker's key checks: the presented keys that queued meanwhile checked and counted
    with one statement (``ratelimit.admit_many``) on the counter engine, whose connections
    autocommit, so a key's counter row stays locked only while that statement runs."""

    def run(presented: Sequence[str]) -> list[ratelimit.Admission]:
        with counter.connect() as connection:
            answers = ratelimit.admit_many(
                connection, presented, default_limit=settings.api_rate_per_minute()
            )
            connection.commit()  # SQLite's transaction; nothing to do in autocommit
        return answers

    return batching.Batcher(run, name="admitter")


def require(scope: str, *, any_scope: bool = False) -> Callable[..., Awaitable[keys.Caller]]:
    """The dependency that admits a key with ``scope`` (``admin`` has every scope); with
    ``any_scope`` every valid key is admitted."""
    if scope not in keys.SCOPES:
        raise ValueError(f"unknown scope {scope!r}")

    async def caller(
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),  # noqa: B008
    ) -> keys.Caller:
        challenge = {"WWW-Authenticate": 'Bearer realm="ai-handler"'}
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise Problem(
                UNAUTHORIZED, "no API key: send 'Authorization: Bearer <key>'", headers=challenge
            )
        admit: batching.Batcher[str, ratelimit.Admission] = request.app.state.admitter
        admission = await admit(credentials.credentials)
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
