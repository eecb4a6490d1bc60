"""``POST /v1/tokens``: a short-lived, read-only token for one user, for a browser.

The application's backend calls it with its API key (``read`` scope) after authenticating its
own user, and hands the token to the page; ``api/tokens.py`` says what the token is.
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from ai_handler_dagster.api import deps, keys, tokens
from ai_handler_dagster.api.problems import INVALID_REQUEST, Problem

router = APIRouter(prefix="/v1", tags=["tokens"])


class TokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user: str = Field(min_length=1, max_length=255, description="The user the token reads for.")
    ttl_s: int = Field(
        default=tokens.DEFAULT_TTL_S,
        ge=1,
        le=tokens.MAX_TTL_S,
        description="Seconds the token stays valid.",
    )


class TokenView(BaseModel):
    token: str = Field(
        description="Send it as 'Authorization: Bearer <token>', or as '?access_token=' where a "
        "header cannot be sent (EventSource)."
    )
    user: str
    scopes: list[str]
    expires_at: datetime


@router.post(
    "/tokens",
    status_code=201,
    summary="A short-lived, read-only token for one user (for a browser)",
    response_model=TokenView,
)
async def create_token(
    body: TokenRequest,
    caller: keys.Caller = Depends(deps.require(keys.READ)),  # noqa: B008
    counter: sa.Engine = Depends(deps.counter_engine),  # noqa: B008
) -> TokenView:
    def mint() -> tokens.Token:
        with counter.connect() as connection:
            return tokens.mint(connection, caller, body.user, ttl_s=body.ttl_s)

    try:
        minted = await run_in_threadpool(mint)
    except tokens.TokenRefused as exc:
        raise Problem(
            INVALID_REQUEST, str(exc), errors=[{"field": "user", "message": str(exc)}]
        ) from exc
    return TokenView(
        token=minted.token,
        user=minted.user,
        scopes=list(minted.scopes),
        expires_at=datetime.fromtimestamp(minted.expires_at, UTC),
    )
