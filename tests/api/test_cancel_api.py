"""``POST /v1/generations/{id}/cancel`` over real HTTP, on SQLite and PostgreSQL.

Proves: a pending generation is canceled (200, its state, its hold released) and a repeated
cancel answers the same state with ``canceled`` false and writes nothing; a running one's
prediction is canceled at the provider (the emulator); a succeeded or failed generation is 409
``cannot-cancel`` with its status, an unknown one 404, a key without the ``submit`` scope 403 and
no key 401, each leaving every table as it was; the problem type is described by the service.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from ai_handler_dagster import generations as gens
from ai_handler_dagster import ledger
from ai_handler_dagster.api import keys
from ai_handler_dagster.api.app import create_app
from ai_handler_dagster.api.server import start_server
from ai_handler_dagster.db.engine import session_scope
from ai_handler_dagster.db.models import Generation, GenerationEvent, Hold, LedgerEntry
from ai_handler_dagster.devstack.emulator import (
    STUCK_TRIGGER,
    EmulatorConfig,
    EmulatorHandle,
    start_emulator,
)
from ai_handler_dagster.pricing import PriceBook, load_pricing
from ai_handler_dagster.replicate.client import ReplicateClient, ReplicateSettings
from tests.support.api import Api

PROBLEM = "application/problem+json"
SKETCH = "demo/pixel-sketch"
OUTPUT = {
    "key": "outputs/1/a1/0.png",
    "uri": "s3://bucket/outputs/1/a1/0.png",
    "size": 1234,
    "sha256": "ab" * 32,
    "content_type": "image/png",
}


@pytest.fixture(scope="module")
def emulator() -> Iterator[EmulatorHandle]:
    handle = start_emulator(EmulatorConfig(latency_s=0.2, concurrency=8), port=0)
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture
def provider(emulator: EmulatorHandle) -> ReplicateClient:
    return ReplicateClient(ReplicateSettings(api_token=emulator.token, base_url=emulator.base_url))


@pytest.fixture
def prices() -> PriceBook:
    return load_pricing()


@pytest.fixture
def api(engine: sa.Engine, prices: PriceBook, provider: ReplicateClient) -> Iterator[Api]:
    app = create_app(engine, prices=prices)
    app.state.replicate = provider  # the route's provider client (else the environment's)
    with start_server(app) as handle:
        yield Api(handle.url, engine)


def generation(engine: sa.Engine, prices: PriceBook, *, prediction: str | None = None) -> int:
    with session_scope(engine) as session:
        ledger.grant(session, "alice", 100, "fund-alice")
    with session_scope(engine) as session:
        gid = gens.submit(
            session, user_id="alice", model=SKETCH, input={"prompt": "a fox"}, prices=prices
        ).id
    if prediction is not None:
        with session_scope(engine) as session:
            gens.start_attempt(session, gid, run_id="run-1", prices=prices)
            gens.record_prediction(session, gid, prediction, SKETCH, "v1")
    return gid


def tables(engine: sa.Engine) -> dict[str, Any]:
    with session_scope(engine) as session:
        return {
            "generations": session.execute(
                sa.select(Generation.id, Generation.status, Generation.error_code)
            ).all(),
            "holds": session.execute(sa.select(Hold.id, Hold.status)).all(),
            "entries": session.scalar(sa.select(sa.func.count()).select_from(LedgerEntry)),
            "events": session.scalar(sa.select(sa.func.count()).select_from(GenerationEvent)),
        }


def problem(answer: httpx.Response, status: int, slug: str) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith(PROBLEM)
    body: dict[str, Any] = answer.json()
    assert body["type"] == f"/problems/{slug}" and body["status"] == status
    return body


def test_a_pending_generation_is_canceled_and_a_repeat_answers_the_same(
    api: Api, engine: sa.Engine, prices: PriceBook
) -> None:
    gid = generation(engine, prices)
    with api.client(api.key(keys.SUBMIT)) as http:
        first = http.post(f"/v1/generations/{gid}/cancel")
        assert first.status_code == 200, first.text
        body = first.json()
        assert {k: body[k] for k in ("id", "status", "canceled", "error_code")} == {
            "id": gid,
            "status": "canceled",
            "canceled": True,
            "error_code": "canceled_by_request",
        }
        assert (body["credits_released"], body["credits_charged"], body["prediction"]) == (
            5,
            0,
            None,
        )
        assert body["links"]["self"] == f"/v1/generations/{gid}"
        before = tables(engine)
        again = http.post(f"/v1/generations/{gid}/cancel")
        assert again.status_code == 200
        assert again.json() == {**body, "canceled": False}
        assert tables(engine) == before
    with session_scope(engine) as session:
        assert ledger.balance(session, "alice") == ledger.Balance(
            balance=100, held=0, available=100
        )
        assert [*ledger.verify(session), *gens.verify(session)] == []


def test_a_running_generation_s_prediction_is_canceled_at_the_provider(
    api: Api, engine: sa.Engine, prices: PriceBook, provider: ReplicateClient
) -> None:
    pid = provider.create(SKETCH, {"prompt": f"forever {STUCK_TRIGGER}"}).id
    gid = generation(engine, prices, prediction=pid)
    with api.client(api.key(keys.SUBMIT)) as http:
        answer = http.post(f"/v1/generations/{gid}/cancel")
    assert answer.status_code == 200, answer.text
    assert answer.json()["prediction"] == {"id": pid, "cancel": "requested"}
    deadline = time.monotonic() + 10
    while provider.get(pid).status != "canceled":
        assert time.monotonic() < deadline, "the prediction was not canceled at the provider"
        time.sleep(0.05)
    with session_scope(engine) as session:
        assert gens.get(session, gid).status == "canceled"
        assert [*ledger.verify(session), *gens.verify(session)] == []


@pytest.mark.parametrize("ending", ["succeeded", "failed"])
def test_an_ended_generation_is_409_with_its_status(
    api: Api, engine: sa.Engine, prices: PriceBook, ending: str
) -> None:
    gid = generation(engine, prices, prediction="pred-1")
    with session_scope(engine) as session:
        if ending == "succeeded":
            gens.succeed(session, gid, outputs=[OUTPUT], predict_time=1.0, prices=prices)
        else:
            gens.fail(session, gid, code="prediction_failed", message="boom")
    before = tables(engine)
    with api.client(api.key(keys.SUBMIT)) as http:
        body = problem(http.post(f"/v1/generations/{gid}/cancel"), 409, "cannot-cancel")
        assert (body["generation_status"], body["finishing"], body["generation_id"]) == (
            ending,
            False,
            gid,
        )
        described = http.get("/problems/cannot-cancel").json()
        assert described["status"] == 409 and "succeeded" in described["description"]
    assert tables(engine) == before


def test_unknown_ids_wrong_scopes_and_missing_keys_are_refused(
    api: Api, engine: sa.Engine, prices: PriceBook
) -> None:
    gid = generation(engine, prices)
    before = tables(engine)
    with api.client(api.key(keys.SUBMIT)) as http:
        problem(http.post("/v1/generations/999/cancel"), 404, "not-found")
        problem(http.post("/v1/generations/0/cancel"), 422, "invalid-request")
        problem(http.post("/v1/generations/abc/cancel"), 422, "invalid-request")
    with api.client(api.key(keys.READ)) as http:
        body = problem(http.post(f"/v1/generations/{gid}/cancel"), 403, "forbidden-scope")
        assert body["required_scope"] == "submit"
    with api.client() as http:
        problem(http.post(f"/v1/generations/{gid}/cancel"), 401, "unauthorized")
    assert tables(engine) == before
