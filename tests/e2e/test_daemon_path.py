"""End to end through the real path, once on SQLite and once on PostgreSQL.

Rows that an application inserts straight into the generations table are picked up by the request
sensor of a real ``dagster-daemon`` (temporary DAGSTER_HOME), run in run workers of the code
location, and settled. With SQLite everywhere (the embedded setup) and with PostgreSQL for both
the Dagster storage and the app database (production's setup), this proves that:

- every request ends ``succeeded`` in a run the sensor launched, with its outputs in S3 under their
  exact keys, with the sizes and sha256 checksums recorded on the row, after exactly one paid
  prediction, charged once through its one captured hold;
- a model failure (a prompt containing ``[fail]``) ends ``failed`` and is refunded exactly once:
  its one hold has one release entry and the user's balance is untouched;
- ``ledger.verify`` and ``generations.verify`` find nothing wrong.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from dagster import DagsterRunStatus

from tests.support.db import pg_databases
from tests.support.stack import (
    App,
    StackUnderTest,
    dagster_instance,
    predictions_with_prompt,
    run_events,
    running_stack,
    runs_of_batch,
    s3_body,
    s3_keys,
    sha256,
    stack_config,
    unique,
    wait_batch_runs_finished,
)

pytestmark = pytest.mark.e2e

GRANT = 500
PIXEL_PRICE = 5  # pricing.toml: demo/pixel-sketch is 5 credits per image stored
HAIKU_MAX = 60  # demo/haiku-text: per token, holding 60 with the default max_tokens

#: (model, input, file names expected under generations/{id}/a1/)
REQUESTS = [
    ("demo/pixel-sketch", {"prompt": "a lighthouse at dusk", "seed": 1}, ["0.png"]),
    ("demo/pixel-sketch", {"prompt": "two moons", "num_outputs": 2, "seed": 7}, ["0.png", "1.png"]),
    ("demo/haiku-text", {"prompt": "autumn rain on a tin roof"}, ["0.txt"]),
]


@pytest.fixture(
    scope="module",
    params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)],
)
def env(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, pg_available: bool
) -> Iterator[StackUnderTest]:
    state: Path = tmp_path_factory.mktemp(f"stack-{request.param}")
    if request.param == "sqlite":
        with running_stack(stack_config(state)) as stack:
            yield StackUnderTest(stack, App(stack.app_db_url))
        return
    with pg_databases(pg_available) as dbs:
        # A bare postgresql:// URL, as an operator writes it. Regression: SQLAlchemy 2.1 maps it
        # to psycopg 3, on which dagster-postgres's NOTIFY after each event write fails ("syntax
        # error at or near $1"), so no run could start; the stack now names psycopg2.
        dagster_url = sa.make_url(dbs.dagster_url).set(drivername="postgresql")
        config = stack_config(
            state,
            storage="postgres",
            dagster_pg_url=dagster_url.render_as_string(hide_password=False),
            app_db_url=dbs.app_url,
        )
        with running_stack(config) as stack:
            app = App(stack.app_db_url)
            try:
                yield StackUnderTest(stack, app)
            finally:
                app.engine.dispose()


@dataclass
class Submitted:
    """What the module inserted up front (so both scenarios run concurrently)."""

    env: StackUnderTest
    user: str
    expected_files: dict[int, list[str]]
    prompts: dict[int, str]
    failing_user: str
    failing_id: int
    failing_prompt: str


@pytest.fixture(scope="module")
def submitted(env: StackUnderTest) -> Submitted:
    app = env.app
    user, failing_user = unique("ada"), unique("bob")
    app.grant(user, GRANT)
    app.grant(failing_user, GRANT)
    expected: dict[int, list[str]] = {}
    prompts: dict[int, str] = {}
    for model, payload, files in REQUESTS:
        # A unique prompt per module run: the emulator's log of predictions is matched by it.
        payload = {**payload, "prompt": f"{payload['prompt']} ({user})"}
        generation_id = app.insert(user, model, payload)
        expected[generation_id] = files
        prompts[generation_id] = payload["prompt"]
    failing_prompt = f"a glitching robot [fail] ({failing_user})"
    failing_id = app.insert(failing_user, "demo/pixel-sketch", {"prompt": failing_prompt})
    return Submitted(env, user, expected, prompts, failing_user, failing_id, failing_prompt)


def test_inserted_rows_succeed_with_their_outputs_in_s3(submitted: Submitted) -> None:
    stack, app = submitted.env.stack, submitted.env.app
    ids = list(submitted.expected_files)
    rows = app.wait_terminal(ids)
    assert {gid: row.status for gid, row in rows.items()} == dict.fromkeys(ids, "succeeded"), {
        gid: (row.error_code, row.error_message) for gid, row in rows.items()
    }

    for gid, names in submitted.expected_files.items():
        row = rows[gid]
        keys = [f"generations/{gid}/a1/{name}" for name in names]
        # Exactly these objects exist, listed through the S3 API, and the row records them.
        assert s3_keys(stack, f"generations/{gid}/") == keys
        assert [obj["key"] for obj in row.outputs or []] == keys
        for obj in row.outputs or []:
            body = s3_body(stack, obj["key"])
            assert len(body) == obj["size"] > 0
            assert sha256(body) == obj["sha256"]
        # One paid prediction, one hold, captured once for what was charged.
        [prediction] = predictions_with_prompt(stack, submitted.prompts[gid])
        assert prediction["id"] == row.prediction_id
        assert prediction["status"] == "succeeded"
        [hold] = app.holds(gid)
        assert (hold.id, hold.status, hold.captured_amount) == (
            row.hold_id,
            "captured",
            row.amount_charged,
        )
        assert app.entry_kinds(hold.id) == ["hold", "capture"]
        if row.model == "demo/pixel-sketch":
            assert row.amount_charged == PIXEL_PRICE * len(row.outputs or [])
        else:
            assert 1 <= row.amount_charged <= HAIKU_MAX

    # Each generation ran in one run, launched by the request sensor, that succeeded.
    with dagster_instance(stack) as instance:
        for row in rows.values():
            assert row.batch_key is not None
            runs = runs_of_batch(instance, row.batch_key)
            assert [(r.run_id, r.status) for r in runs] == [
                (row.dagster_run_id, DagsterRunStatus.SUCCESS)
            ], {r.run_id: run_events(instance, r.run_id)[-8:] for r in runs}
            assert runs[0].tags.get("dagster/sensor_name") == "generation_request_sensor"

    charged = sum(row.amount_charged for row in rows.values())
    balance = app.balance(submitted.user)
    assert (balance.balance, balance.held) == (GRANT - charged, 0)
    assert app.violations() == []


def test_a_model_failure_is_refunded_exactly_once(submitted: Submitted) -> None:
    stack, app = submitted.env.stack, submitted.env.app
    gid = submitted.failing_id
    row = app.wait_terminal([gid])[gid]
    assert (row.status, row.error_code, row.amount_charged) == ("failed", "prediction_failed", 0)

    # Its run handled the failure itself and succeeded, so the refund sensors stay out of it.
    with dagster_instance(stack) as instance:
        assert row.batch_key is not None
        runs = wait_batch_runs_finished(instance, row.batch_key)
        assert [r.status for r in runs] == [DagsterRunStatus.SUCCESS]

    [prediction] = predictions_with_prompt(stack, submitted.failing_prompt)
    assert prediction["status"] == "failed"
    [hold] = app.holds(gid)
    assert hold.status == "released"
    assert app.entry_kinds(hold.id) == ["hold", "release"]
    balance = app.balance(submitted.failing_user)
    assert (balance.balance, balance.held, balance.available) == (GRANT, 0, GRANT)
    assert app.violations() == []
