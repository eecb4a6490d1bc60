"""The request sensor woken up by new requests (``runtime/wake.py``).

- Racing its own ticks (every second, as shipped): submits through the service arrive in
  bursts while an application inserts rows with plain SQL, each arrival waking the sensor
  (PostgreSQL: the trigger of migration 0012 and ``LISTEN``; SQLite: the daemon's poll).
  Whatever the interleaving, every generation is claimed once (one ``queued`` event), by one
  batch, whose one run holds exactly the batch's generations, and succeeds after one paid
  prediction; the ledger verifies.
- Idle, with the sensor's own ticks a minute apart: a submit and an application's INSERT are
  queued within 10 s of becoming pending (with wake-ups off, ``AI_HANDLER_SENSOR_WAKE=0``,
  that test fails: they wait for the next tick).
"""

from __future__ import annotations

import random
import threading
from collections import Counter, defaultdict
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from ai_handler_dagster.db.models import GenerationEvent
from ai_handler_dagster.domain import RunTag
from ai_handler_dagster.runtime.ticks import sensor_has_ticked
from ai_handler_dagster.runtime.wake import REQUEST_SENSOR
from tests.support.stack import (
    App,
    StackUnderTest,
    dagster_instance,
    predictions_with_prompt,
    runs_of_batch,
    stack_on,
    unique,
    wait_for,
)

pytestmark = pytest.mark.e2e

SUBMITTERS = 4
SUBMITS_EACH = 8
INSERTS = 8
SENSOR_INTERVAL_S = 60
#: Far above what a woken claim takes, far below the sensor's own interval.
CLAIMED_WITHIN_S = 10


DIALECTS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(scope="module", params=DIALECTS)
def env(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, pg_available: bool
) -> Iterator[StackUnderTest]:
    """The e2e stack: the sensor's own ticks every second, racing the woken ones."""
    state = tmp_path_factory.mktemp(f"fast-{request.param}")
    with stack_on(request.param, state, pg_available) as stack:
        yield stack


@pytest.fixture(scope="module", params=DIALECTS)
def slow_ticks(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, pg_available: bool
) -> Iterator[StackUnderTest]:
    """The sensor's own ticks a minute apart: only wake-ups start requests sooner."""
    state = tmp_path_factory.mktemp(f"fast-slow-{request.param}")
    env = {"AI_HANDLER_SENSOR_INTERVAL_S": str(SENSOR_INTERVAL_S)}
    with stack_on(request.param, state, pg_available, extra_env=env) as stack:
        yield stack


def _wait_first_tick(stack: StackUnderTest) -> None:
    with dagster_instance(stack.stack) as instance:
        wait_for(
            lambda: sensor_has_ticked(instance, REQUEST_SENSOR),
            timeout_s=120,
            what="the request sensor's first tick",
        )


def _queued_events(app: App, ids: list[int]) -> list[sa.Row[Any]]:
    with app.engine.connect() as conn:
        return list(
            conn.execute(
                sa.select(GenerationEvent.generation_id, GenerationEvent.at).where(
                    GenerationEvent.generation_id.in_(ids), GenerationEvent.status == "queued"
                )
            ).all()
        )


def test_idle_requests_start_without_waiting_for_the_next_tick(
    slow_ticks: StackUnderTest,
) -> None:
    """Regression for the idle wait: a request waited for the sensor's next tick. Here that
    tick is a minute away; a submit and an application's INSERT start within seconds."""
    stack, app = slow_ticks.stack, slow_ticks.app
    user = unique("idle")
    app.grant(user, 1000)
    _wait_first_tick(slow_ticks)
    headers = {"Authorization": f"Bearer {stack.local_api_key()}"}
    ids: list[int] = []
    with httpx.Client(base_url=stack.api_url, headers=headers, timeout=60) as client:
        for n in range(3):
            answer = client.post(
                "/v1/generations",
                json={"user": user, "model": "demo/pixel-sketch", "input": {"prompt": f"i{n}"}},
            )
            assert answer.status_code == 202, answer.text
            ids.append(int(answer.json()["id"]))
            app.wait_terminal(ids[-1:])
    ids.append(app.insert(user, "demo/pixel-sketch", {"prompt": "inserted"}))
    rows = app.wait_terminal(ids, timeout_s=SENSOR_INTERVAL_S - 5)
    assert {r.status for r in rows.values()} == {"succeeded"}
    waited = {
        r.generation_id: (r.at - rows[r.generation_id].pending_since).total_seconds()
        for r in _queued_events(app, ids)
    }
    assert sorted(waited) == ids
    assert max(waited.values()) < CLAIMED_WITHIN_S, waited


def test_racing_submits_and_ticks_claim_each_generation_once(env: StackUnderTest) -> None:
    stack, app = env.stack, env.app
    users = [unique(f"racer{i}") for i in range(SUBMITTERS)]
    for user in users:
        app.grant(user, 10_000)
    key = stack.local_api_key()
    prompts: dict[int, str] = {}
    lock = threading.Lock()
    errors: list[str] = []

    def submit(user: str, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(
            base_url=stack.api_url, headers={"Authorization": f"Bearer {key}"}, timeout=60
        ) as client:
            for n in range(SUBMITS_EACH):
                prompt = f"race {user} {n}"
                answer = client.post(
                    "/v1/generations",
                    json={"user": user, "model": "demo/pixel-sketch", "input": {"prompt": prompt}},
                )
                if answer.status_code != 202:
                    errors.append(f"{answer.status_code} {answer.text}")
                    return
                with lock:
                    prompts[int(answer.json()["id"])] = prompt
                # Bursts and pauses around the sensor's one-second ticks.
                threading.Event().wait(rng.choice([0, 0, 0.05, 0.3, 0.7]))

    def insert() -> None:
        for n in range(INSERTS):
            prompt = f"race inserted {users[0]} {n}"
            generation_id = app.insert(users[0], "demo/pixel-sketch", {"prompt": prompt})
            with lock:
                prompts[generation_id] = prompt
            threading.Event().wait(0.2)

    threads = [threading.Thread(target=submit, args=(u, i)) for i, u in enumerate(users)]
    threads.append(threading.Thread(target=insert))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(prompts) == SUBMITTERS * SUBMITS_EACH + INSERTS

    ids = sorted(prompts)
    rows = app.wait_terminal(ids)
    assert {r.status for r in rows.values()} == {"succeeded"}, {
        gid: (r.status, r.error_code) for gid, r in rows.items()
    }
    queued = Counter(r.generation_id for r in _queued_events(app, ids))
    assert queued == dict.fromkeys(ids, 1)

    batches: dict[str, set[int]] = defaultdict(set)
    for gid, row in rows.items():
        assert row.batch_key is not None
        batches[row.batch_key].add(gid)
    with dagster_instance(stack) as instance:
        for batch_key, members in batches.items():
            [run] = runs_of_batch(instance, batch_key)
            ops = run.run_config["ops"]  # type: ignore[index]
            assert set(ops["reserve_credits"]["config"]["generation_ids"]) == members
            assert run.tags[RunTag.BATCH_SIZE] == str(len(members))
            assert {rows[g].dagster_run_id for g in members} == {run.run_id}
    for gid, prompt in prompts.items():
        assert [p["id"] for p in predictions_with_prompt(stack, prompt)] == [
            rows[gid].prediction_id
        ]
    assert app.violations() == []
