"""``POST /v1/generations/{id}/cancel`` (scope ``submit``): ``cancel.cancel_generation``, the
same cancel as ``ai-handler cancel``.

- 200 with the generation's state once it is canceled: by this request (``canceled`` true) or
  an earlier one (``canceled`` false: a repeated cancel gets the same state, nothing changes).
  Pending or queued ones are simply canceled; a running one's hold is released at once and its
  prediction's cancel is sent to the provider (``prediction.cancel``).
- 409 ``cannot-cancel`` with ``generation_status`` when it had already succeeded (charged,
  outputs kept), failed (refunded), or its prediction had already succeeded at the provider
  (``finishing``: the run completes and charges it). Nothing is written.
- 404 for an unknown id.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Path, Request

from ai_handler_dagster import generations as gens
from ai_handler_dagster.api import deps, keys
from ai_handler_dagster.api.problems import NOT_FOUND, Problem, problem_type
from ai_handler_dagster.cancel import cancel_generation, provider_client
from ai_handler_dagster.replicate.client import ReplicateClient

router = APIRouter(tags=["generations"])

CANNOT_CANCEL = problem_type(
    "cannot-cancel",
    409,
    "The generation can no longer be canceled",
    "The generation ended before the cancel: 'generation_status' is 'succeeded' (it was charged "
    "and its outputs are kept) or 'failed' (its credits were returned). With 'finishing' true "
    "it is still 'running' but its prediction already succeeded at the provider: the work is done "
    "and paid for, so the generation completes and is charged. Nothing was changed.",
)

#: Largest generation id (the column is a 64-bit integer).
_MAX_ID = 2**63 - 1


def _client(request: Request) -> ReplicateClient | None:
    # ``app.state.replicate`` when the embedding code set one (tests); else the environment's.
    client: ReplicateClient | None = getattr(request.app.state, "replicate", None)
    return client if client is not None else provider_client()


@router.post(
    "/v1/generations/{generation_id}/cancel",
    summary="Cancel a generation",
    responses={
        404: {"description": "Unknown generation"},
        409: {"description": "Already succeeded or failed, or its prediction succeeded"},
    },
)
def cancel(
    request: Request,
    generation_id: int = Path(ge=1, le=_MAX_ID),
    engine: sa.Engine = Depends(deps.engine),  # noqa: B008
    caller: keys.Caller = Depends(deps.require(keys.SUBMIT)),  # noqa: B008
) -> dict[str, Any]:
    try:
        result = cancel_generation(
            engine,
            generation_id,
            client=_client(request),
            message=f"canceled by API key {caller.key_id}",
        )
    except gens.UnknownGeneration:
        raise Problem(NOT_FOUND, f"no generation {generation_id}") from None
    except gens.CannotCancel as exc:
        raise Problem(
            CANNOT_CANCEL,
            str(exc),
            generation_id=generation_id,
            # Not "status": that member is the HTTP status of every problem (RFC 9457).
            generation_status=exc.status,
            finishing=exc.finishing,
        ) from None
    row = result.generation
    return {
        "id": row["id"],
        "status": row["status"],
        "canceled": result.changed,
        "error_code": row["error_code"],
        "error_message": row["error_message"],
        "attempt": row["attempt"],
        # Canceled: nothing is charged, and what was held is back in the user's balance.
        "credits_released": row["amount_held"],
        "credits_charged": row["amount_charged"],
        "finished_at": row["finished_at"],
        "prediction": (
            {"id": result.prediction_id, "cancel": result.provider}
            if result.prediction_id
            else None
        ),
        "links": {
            "self": f"/v1/generations/{row['id']}",
            "cancel": f"/v1/generations/{row['id']}/cancel",
        },
    }
