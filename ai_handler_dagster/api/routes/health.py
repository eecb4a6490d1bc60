"""``GET /healthz`` (the process answers), ``GET /readyz`` (the database answers too) and
``GET /problems/{slug}`` (what each problem ``type`` means)."""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter, Depends

from ai_handler_dagster.api import deps
from ai_handler_dagster.api.problems import NOT_FOUND, UNAVAILABLE, Problem, describe

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The service answers")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="The service and its database answer",
    responses={503: {"description": "the database is unreachable"}},
)
def readyz(engine: sa.Engine = Depends(deps.engine)) -> dict[str, str]:  # noqa: B008
    try:
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
    except sa.exc.SQLAlchemyError as exc:
        log.warning("readiness check failed: %s", type(exc).__name__)
        raise Problem(UNAVAILABLE, "the database is unreachable") from None
    return {"status": "ready"}


@router.get(
    "/problems/{slug}",
    summary="What a problem type means",
    responses={404: {"description": "no problem type of that name"}},
)
def problem(slug: str) -> dict[str, Any]:
    found = describe(slug)
    if found is None:
        raise Problem(NOT_FOUND, f"no problem type {slug!r}")
    return found
