"""End to end: the emulator sends signed webhooks, the service records them, waiting reads them.

Proves, on SQLite and PostgreSQL: predictions created with the unmodified ``replicate`` client
and ``webhook=<service>/webhooks/replicate`` (every event: start, logs, output, completed)
land in ``prediction_states`` with their terminal state and final output, using the secret
from ``GET /v1/webhooks/default/secret``; ``wait_many`` with the lookup and ``expect_webhooks``
yields them all with one GET each (polling alone would need many); with a service that refuses
every webhook (another secret) nothing is recorded and ``wait_many`` still finishes by polling.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
import replicate
import sqlalchemy as sa

from ai_handler_dagster.devstack.emulator import (
    FAIL_TRIGGER,
    EmulatorConfig,
    EmulatorHandle,
    start_emulator,
)
from ai_handler_dagster.replicate.client import ReplicateClient
from ai_handler_dagster.replicate.waiting import wait_many
from ai_handler_dagster.resources.replicate import ReplicateResource
from ai_handler_dagster.webhooks import WEBHOOK_PATH
from ai_handler_dagster.webhooks.config import SECRET_VAR, fetch_secret
from ai_handler_dagster.webhooks.lookup import make_batched_lookup, make_lookup
from tests.support.api import running_api
from tests.support.webhooks import SECRET, state_of
from tests.webhooks.conftest import Deliveries


@pytest.fixture
def emulator() -> Iterator[EmulatorHandle]:
    config = EmulatorConfig(latency_s=0.3, concurrency=8, webhook_retry_delay_s=0.05)
    with start_emulator(config, port=0) as handle:
        yield handle


def _client(emulator: EmulatorHandle) -> replicate.Client:
    return replicate.Client(api_token=emulator.token, base_url=emulator.base_url, trust_env=False)


def _resource(
    emulator: EmulatorHandle, poll_max_s: float, webhook_fallback_s: float = 30.0
) -> ReplicateClient:
    return ReplicateResource(
        api_token=emulator.token,
        base_url=emulator.base_url,
        timeout_s=5.0,
        poll_initial_s=0.05,
        poll_max_s=poll_max_s,
        webhook_fallback_s=webhook_fallback_s,
    ).get_client()


def _gets(emulator: EmulatorHandle) -> int:
    return emulator.stats()["requests"].get("GET /v1/predictions/{id}", 0)


def _create(client: replicate.Client, url: str, n: int) -> dict[str, str]:
    """``n`` predictions (the last one fails); returns id -> prompt."""
    made = {}
    for i in range(n):
        prompt = f"{FAIL_TRIGGER} lighthouse" if i == n - 1 else f"lighthouse {i}"
        model = "demo/haiku-text" if i % 2 else "demo/pixel-sketch"
        p = client.models.predictions.create(model=model, input={"prompt": prompt}, webhook=url)
        made[p.id] = prompt
    return made


def test_webhooks_land_in_the_database_and_replace_polling(
    engine: sa.Engine,
    emulator: EmulatorHandle,
    monkeypatch: pytest.MonkeyPatch,
    deliveries: Deliveries,
) -> None:
    # The secret comes from the provider's API, as in production.
    secret = fetch_secret(emulator.base_url, emulator.token)
    assert secret == emulator.webhook_secret
    monkeypatch.setenv(SECRET_VAR, secret)
    with running_api(engine) as api:
        made = _create(_client(emulator), api.url + WEBHOOK_PATH, 5)
        # Webhooks alone: a GET is only due every 30 s, far beyond this test.
        resource = _resource(emulator, poll_max_s=30.0)
        started = time.monotonic()
        finished = list(
            wait_many(
                resource,
                list(made),
                lookup=make_batched_lookup(engine, made, max_age_s=0.05),
                expect_webhooks=True,
                deadline_s=20,
            )
        )
        assert time.monotonic() - started < 15
        # One look at the API per prediction when waiting starts; the rest came by webhook.
        assert _gets(emulator) <= len(made)

        by_id = {s.id: s for s in finished}
        assert sorted(by_id) == sorted(made)
        truth = {p["id"]: p for p in emulator.predictions()}
        for pid, prompt in made.items():
            expected = "failed" if FAIL_TRIGGER in prompt else "succeeded"
            assert by_id[pid].status == expected
            status, payload = state_of(engine, pid)  # type: ignore[misc]
            assert status == expected
            assert payload["output"] == truth[pid]["output"]
            assert payload["input"] == {"prompt": prompt}
            found = make_lookup(engine)(pid)
            assert found is not None and found.status == expected
    # Every event of every prediction was delivered once and answered 204.
    webhooks = emulator.stats()["webhooks"]
    assert webhooks["failed"] == 0 and webhooks["retried"] == 0
    counted = deliveries.since_start()
    assert set(counted) <= {"accepted", "out_of_order"}
    assert counted["accepted"] + counted.get("out_of_order", 0) == webhooks["delivered"]
    assert webhooks["delivered"] >= 3 * len(made)


def test_refused_webhooks_fall_back_to_polling(
    engine: sa.Engine,
    emulator: EmulatorHandle,
    monkeypatch: pytest.MonkeyPatch,
    deliveries: Deliveries,
) -> None:
    # A service with another secret refuses every delivery: the webhook never arrives.
    assert emulator.webhook_secret != SECRET
    monkeypatch.setenv(SECRET_VAR, SECRET)
    with running_api(engine) as api:
        made = _create(_client(emulator), api.url + WEBHOOK_PATH, 3)
        resource = _resource(emulator, poll_max_s=0.3, webhook_fallback_s=0.3)
        finished = list(
            wait_many(
                resource,
                list(made),
                lookup=make_lookup(engine),
                expect_webhooks=True,
                deadline_s=20,
            )
        )
        assert sorted(s.id for s in finished) == sorted(made)
        assert all(s.is_terminal for s in finished)
        counted = deliveries.since_start()
        assert counted.get("refused_401", 0) >= len(made)
        assert set(counted) == {"refused_401"}
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM prediction_states")).scalar() == 0
    # Polling found them: at least one GET each, after the fallback interval.
    assert _gets(emulator) >= len(made)


def test_the_secret_endpoint_needs_the_token(emulator: EmulatorHandle) -> None:
    with pytest.raises(replicate.exceptions.ReplicateError):
        fetch_secret(emulator.base_url, "r8_wrong")
    with httpx.Client(trust_env=False) as http:
        assert http.get(emulator.base_url + "/v1/webhooks/default/secret").status_code == 401
