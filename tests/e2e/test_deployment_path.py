"""A generation through a Replicate deployment, end to end through the real path, on SQLite and
on PostgreSQL.

The embedded stack runs its emulator with a deployment (``--deployment
acme/sketcher=demo/pixel-sketch``) and every create answer dropped (``--drop-create-rate 1``:
the prediction starts, the connection is cut before the answer), and a price table that prices
the deployment apart from its model. Rows an application inserts, one for the deployment and
one for the plain model with the same input, are claimed by the request sensor of a real
``dagster-daemon``, run in run workers and settled. This proves that the deployment's
generation is created through the deployment, its lost answer adopted exactly once (one paid
prediction, naming the deployment, next to the plain model's own), its outputs stored, and
that it is charged the deployment's price, not the model's.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ai_handler_dagster.domain import RunTag
from tests.support.stack import (
    StackUnderTest,
    dagster_instance,
    predictions_with_prompt,
    runs_of_batch,
    s3_keys,
    stack_on,
    unique,
)

pytestmark = pytest.mark.e2e

PRICES = """
[models."demo/pixel-sketch"]
credits_per_output = 5
outputs_field = "num_outputs"
outputs_default = 1
outputs_max = 4

[models."deployment:acme/sketcher"]
credits_per_output = 3
outputs_field = "num_outputs"
outputs_default = 1
outputs_max = 4
"""
EMULATOR_ARGS = ["--deployment", "acme/sketcher=demo/pixel-sketch", "--drop-create-rate", "1"]


@pytest.fixture(
    scope="module",
    params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)],
)
def env(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, pg_available: bool
) -> Iterator[StackUnderTest]:
    state: Path = tmp_path_factory.mktemp(f"deployment-{request.param}")
    prices = state / "prices.toml"
    prices.write_text(PRICES)
    settings = {
        "emulator_args": EMULATOR_ARGS,
        "extra_env": {"AI_HANDLER_PRICING_FILE": str(prices)},
    }
    with stack_on(request.param, state, pg_available, **settings) as stack:
        yield stack


def test_a_deployment_generation_is_adopted_once_and_charged_its_price(
    env: StackUnderTest,
) -> None:
    stack, app = env.stack, env.app
    user = unique("ada")
    app.grant(user, 100)
    prompt = f"a fleet of sketches ({user})"
    payload = {"prompt": prompt, "num_outputs": 2, "seed": 4, "width": 64, "height": 64}
    deployed = app.insert(user, "deployment:acme/sketcher", payload)
    plain = app.insert(user, "demo/pixel-sketch", payload)
    rows = app.wait_terminal([deployed, plain])
    assert {gid: row.status for gid, row in rows.items()} == {
        deployed: "succeeded",
        plain: "succeeded",
    }, {gid: (row.error_code, row.error_message) for gid, row in rows.items()}

    # Two paid predictions, both answers lost: each generation adopted its own.
    made = {p["id"]: p for p in predictions_with_prompt(stack, prompt)}
    assert sorted(made) == sorted([rows[deployed].prediction_id, rows[plain].prediction_id])
    mine, theirs = made[rows[deployed].prediction_id], made[rows[plain].prediction_id]
    assert mine["deployment"] == "acme/sketcher" and "deployment" not in theirs
    assert mine["_emulator"]["response_dropped"] and theirs["_emulator"]["response_dropped"]
    assert all(p["status"] == "succeeded" and p["_emulator"]["paid"] for p in made.values())

    assert s3_keys(stack, f"generations/{deployed}/") == [
        f"generations/{deployed}/a1/0.png",
        f"generations/{deployed}/a1/1.png",
    ]
    # The deployment's 3 credits per image, the model's 5.
    assert (rows[deployed].amount_charged, rows[plain].amount_charged) == (6, 10)
    [hold] = app.holds(deployed)
    assert (hold.status, hold.captured_amount) == ("captured", 6)
    balance = app.balance(user)
    assert (balance.balance, balance.held) == (100 - 16, 0)
    assert app.violations() == []

    with dagster_instance(stack) as instance:
        batch = rows[deployed].batch_key
        assert batch is not None
        [run] = runs_of_batch(instance, batch)
        # A small backlog: each generation has a run of its own.
        assert run.tags[RunTag.MODEL] == "deployment:acme/sketcher"
