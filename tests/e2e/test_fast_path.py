"""The request sensor woken up by new requests, racing its own ticks (``runtime/wake.py``).

Submits through the service arrive in bursts while an application inserts rows with plain SQL
and the sensor ticks on its own; every arrival wakes the sensor (PostgreSQL: the trigger of
migration 0012 and ``LISTEN``; SQLite: the daemon's poll). Whatever the interleaving:

- every generation is claimed once (one ``queued`` event), by one batch, whose one run holds
  exactly the batch's generations, and succeeds after one paid prediction;
- the wake-ups did the claiming: the sensor's own interval is set to 60 s here, yet every
  generation was queued within 10 s of becoming pending, all submitted after the sensor's
  first tick (with wake-ups off, ``AI_HANDLER_SENSOR_WAKE=0``, this test fails: they wait for
  the next tick, a minute later);
- the ledger verifies.
"""

from __future__ import annotations

import random
import threading
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from ai_handler_dagster.db.models import GenerationEvent
from ai_handler_dagster.domain import RunTag
from ai_handler_dagster.runtime.ticks import sensor_has_ticked
from ai_handler_dagster.runtime.wake import REQUEST_SENSOR
from tests.support.db import pg_databases
from tests.support.stack import (
    App,
    StackUnderTest,
    dagster_instance,
    predictions_with_prompt,
    running_stack,
    runs_of_batch,
    stack_config,
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


@pytest.fixture(
    scope="module",
    params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)],
)
def env(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, pg_available: bool
) -> Iterator[StackUnderTest]:
    state: Path = tmp_path_factory.mktemp(f"fast-{request.param}")
    # The sensor's own ticks a minute apart: only wake-ups can start these generations sooner.
    slow = {"extra_env": {"AI_HANDLER_SENSOR_INTERVAL_S": str(SENSOR_INTERVAL_S)}}
    if request.param == "sqlite":
        with running_stack(stack_config(state, **slow)) as stack:
            yield StackUnderTest(stack, App(stack.app_db_url))
        return
    with pg_databases(pg_available) as dbs:
        config = stack_config(
            state,
            storage="postgres",
            dagster_pg_url=dbs.dagster_url,
            app_db_url=dbs.app_url,
            **slow,
        )
        with running_stack(config) as stack:
            app = App(stack.app_db_url)
            try:
                yield StackUnderTest(stack, app)
            finally:
                app.engine.dispose()


def test_racing_submits_and_ticks_claim_each_generation_once(env: StackUnderTest) -> None:
    stack, app = env.stack, env.app
    users = [unique(f"racer{i}") for i in range(SUBMITTERS)]
    for user in users:
        app.grant(user, 10_000)
    key = stack.local_api_key()
    with dagster_instance(stack) as instance:
        # From here the sensor's own next tick is a minute away.
        wait_for(
            lambda: sensor_has_ticked(instance, REQUEST_SENSOR),
            timeout_s=120,
            what="the request sensor's first tick",
        )
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
    with app.engine.connect() as conn:
        queued_rows = conn.execute(
            sa.select(GenerationEvent.generation_id, GenerationEvent.at).where(
                GenerationEvent.generation_id.in_(ids), GenerationEvent.status == "queued"
            )
        ).all()
    assert Counter(r.generation_id for r in queued_rows) == dict.fromkeys(ids, 1)
    waited = {
        r.generation_id: (r.at - rows[r.generation_id].pending_since).total_seconds()
        for r in queued_rows
    }
    assert max(waited.values()) < CLAIMED_WITHIN_S, waited

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
