"""``GET /v1/key``: the calling key as the service sees it (its id, name, scopes, limits), so an
application can check its configuration. ``?scope=`` also checks that the key has that scope."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Request

from ai_handler_dagster.api import deps, keys
from ai_handler_dagster.api.problems import FORBIDDEN_SCOPE, Problem

router = APIRouter(tags=["keys"])


@router.get("/v1/key", summary="The calling API key")
def who_am_i(
    request: Request,
    scope: Literal["read", "submit", "admin"] | None = None,
    caller: keys.Caller = Depends(deps.require(keys.READ, any_scope=True)),  # noqa: B008
) -> dict[str, Any]:
    if scope is not None and not caller.has(scope):
        raise Problem(
            FORBIDDEN_SCOPE,
            f"the key {caller.key_id} lacks the '{scope}' scope",
            required_scope=scope,
        )
    return {
        "key_id": caller.key_id,
        "name": caller.name,
        "scopes": [s for s in keys.SCOPES if s in caller.scopes],
        "max_priority": caller.max_priority,
        "rate_per_minute": caller.rate_per_minute,
    }
