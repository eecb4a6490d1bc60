"""Generations through Replicate deployments, on SQLite and PostgreSQL.

The generation job runs in process against the Replicate emulator serving two deployments of
``demo/pixel-sketch``, the local S3 endpoint and a migrated app database, with a price table
that prices the deployments apart from their model. It proves that:

- a generation of ``deployment:acme/sketcher`` is created through the deployment, stored and
  charged the deployment's price (not the model's), and the model the provider answered with is
  learned for the reference;
- with every create answer lost, a deployment's generation adopts the prediction that names
  its deployment, exactly once, next to a plain-model generation, another deployment's and a
  website prediction of the same input, each adopting its own;
- when the list does not name deployments, a lost deployment create cannot be told apart from
  the plain model's prediction: the generation fails and is refunded, one prediction was made
  (never a second), and that prediction is neither adopted nor canceled;
- an orphan of a deployment attempt is canceled, and the plain model's prediction of the same
  input is not;
- a batch's run is tagged with the deployment's reference.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from dagster import DagsterInstance

from ai_handler_dagster import adoption, ledger
from ai_handler_dagster import generations as gens
from ai_handler_dagster.db.engine import make_engine, session_scope
from ai_handler_dagster.db.models import CreateAttempt, Generation
from ai_handler_dagster.devstack.emulator import EmulatorHandle, Faults
from ai_handler_dagster.devstack.s3 import LocalS3
from ai_handler_dagster.domain import RunTag
from ai_handler_dagster.orchestration.request_sensor import run_request_for
from ai_handler_dagster.pricing import load_pricing
from ai_handler_dagster.resources.replicate import ReplicateResource
from tests.support.orchestration import grant, run_pending, submit

pytestmark = pytest.mark.usefixtures("aws_env")

SKETCH = "demo/pixel-sketch"
SKETCHER = "deployment:acme/sketcher"
FLEET = "deployment:acme/fleet"
SMALL = {"width": 64, "height": 64}

#: The shipped prices of the demo models, and the deployments' own: 3 credits per image on the
#: sketcher (the model itself costs 5), a fixed 4 per generation on the fleet.
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

[models."deployment:acme/fleet"]
credits = 4
"""


@pytest.fixture
def deployments(
    emulator: EmulatorHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    table = tmp_path / "prices.toml"
    table.write_text(PRICES)
    monkeypatch.setenv("AI_HANDLER_PRICING_FILE", str(table))
    emulator.configure(deployments={"acme/sketcher": SKETCH, "acme/fleet": SKETCH})
    yield


def _rows(app_db: str) -> dict[int, Generation]:
    with session_scope(make_engine(app_db)) as session:
        rows = list(session.scalars(sa.select(Generation)))
        session.expunge_all()
    return {r.id: r for r in rows}


def _attempts(app_db: str) -> dict[int, CreateAttempt]:
    with session_scope(make_engine(app_db)) as session:
        rows = list(session.scalars(sa.select(CreateAttempt)))
        session.expunge_all()
    return {a.generation_id: a for a in rows}


def _verified(app_db: str) -> None:
    with session_scope(make_engine(app_db)) as session:
        assert ledger.verify(session) == [] and gens.verify(session) == []


def _balance(app_db: str, user: str) -> int:
    with session_scope(make_engine(app_db)) as session:
        return ledger.balance(session, user).balance


@pytest.mark.usefixtures("deployments")
def test_a_generation_through_a_deployment_is_charged_the_deployments_price(
    app_db: str, emulator: EmulatorHandle, local_s3: LocalS3, bucket: str, instance: DagsterInstance
) -> None:
    grant(app_db, "ada", 100)
    [gid] = submit(app_db, "ada", [(SKETCHER, {"prompt": "a fleet", "num_outputs": 2, **SMALL})])
    assert _rows(app_db)[gid].amount_held == 6  # the deployment's 3 per image, 2 images
    run_pending(app_db, emulator, local_s3, bucket, instance)
    row = _rows(app_db)[gid]
    assert row.status == "succeeded", (row.error_code, row.error_message)
    [made] = emulator.predictions()
    assert row.prediction_id == made["id"] and made["deployment"] == "acme/sketcher"
    assert emulator.stats()["requests"]["POST /v1/deployments/{owner}/{name}/predictions"] == 1
    # What the provider answered: the model the deployment runs, learned for the reference.
    assert (row.prediction_model, row.prediction_version) == (made["model"], made["version"])
    assert _attempts(app_db)[gid].answered_model == SKETCH
    with session_scope(make_engine(app_db)) as session:
        assert gens.learned_model_names(session, SKETCHER) == {SKETCH}
        assert gens.learned_model_names(session, SKETCH) == set()
    keys = sorted(o["Key"] for o in local_s3.client().list_objects_v2(Bucket=bucket)["Contents"])
    assert [k for k in keys if k.startswith(f"generations/{gid}/")] == [
        f"generations/{gid}/a1/0.png",
        f"generations/{gid}/a1/1.png",
    ]
    # Charged the deployment's price for the two images stored, not the model's 10.
    assert (row.amount_held, row.amount_charged) == (6, 6)
    assert _balance(app_db, "ada") == 100 - 6
    _verified(app_db)


@pytest.mark.usefixtures("deployments")
def test_a_lost_deployment_create_is_adopted_exactly_once(
    app_db: str, emulator: EmulatorHandle, local_s3: LocalS3, bucket: str, instance: DagsterInstance
) -> None:
    """Every create answer lost; one input through the sketcher, the fleet, the plain model
    and the website: each generation adopts the prediction made its own way."""
    emulator.configure(faults=Faults(drop_create_rate=1.0))
    grant(app_db, "bo", 100)
    same = {"prompt": "one input, many ways", "seed": 3, **SMALL}
    web = emulator.web_prediction(SKETCH, same)
    ids = submit(app_db, "bo", [(SKETCHER, same), (FLEET, same), (SKETCH, same)])
    run_pending(app_db, emulator, local_s3, bucket, instance)
    rows = _rows(app_db)
    assert [rows[g].status for g in ids] == ["succeeded"] * 3, [
        (rows[g].error_code, rows[g].error_message) for g in ids
    ]
    made = {p["id"]: p for p in emulator.predictions()}
    owned = {gid: made[rows[gid].prediction_id] for gid in ids}
    assert [owned[gid].get("deployment") for gid in ids] == ["acme/sketcher", "acme/fleet", None]
    assert all(p["_emulator"]["response_dropped"] for p in owned.values())
    # One paid prediction per attempt: nothing created twice, the website's left running.
    assert emulator.stats()["creates"] == 4 and len(made) == 4
    assert sorted(p["id"] for p in owned.values()) == sorted(set(made) - {web["id"]})
    assert made[web["id"]]["status"] == "succeeded"
    assert [rows[g].amount_charged for g in ids] == [3, 4, 5]
    assert _balance(app_db, "bo") == 100 - 12
    _verified(app_db)


@pytest.mark.usefixtures("deployments")
def test_a_lost_create_that_cannot_be_told_apart_is_refunded_not_repeated(
    app_db: str, emulator: EmulatorHandle, local_s3: LocalS3, bucket: str, instance: DagsterInstance
) -> None:
    """The list leaves the deployment field out: the lost prediction looks like the plain
    model's (another application's), so it is not taken, and nothing is created again."""
    emulator.configure(name_deployments=False, faults=Faults(drop_create_rate=1.0))
    grant(app_db, "cy", 50)
    [gid] = submit(app_db, "cy", [(SKETCHER, {"prompt": "unnamed", **SMALL})])
    run_pending(app_db, emulator, local_s3, bucket, instance)
    row = _rows(app_db)[gid]
    assert (row.status, row.error_code) == ("failed", "provider_unavailable")
    assert "cannot be told apart" in (row.error_message or "")
    assert row.prediction_id is None
    [made] = emulator.predictions()
    assert emulator.stats()["creates"] == 1  # never a second paid prediction
    assert emulator.wait_idle(10)
    # Neither adopted nor canceled: it might be someone else's.
    assert {p["id"]: p["status"] for p in emulator.predictions()} == {made["id"]: "succeeded"}
    assert _balance(app_db, "cy") == 50
    _verified(app_db)


@pytest.mark.usefixtures("deployments")
def test_an_orphan_of_a_deployment_attempt_is_canceled_and_the_models_is_not(
    app_db: str, emulator: EmulatorHandle
) -> None:
    emulator.configure(latency_s=30.0)
    grant(app_db, "di", 50)
    engine = make_engine(app_db)
    same = {"prompt": "orphaned", **SMALL}
    [gid] = submit(app_db, "di", [(SKETCHER, same)])
    with session_scope(engine) as session:
        gens.start_attempt(session, gid, run_id="run-1", prices=load_pricing())
        gens.begin_create(session, gid, attempt=1)
        gens.create_lost(session, gid, 1)
    client = ReplicateResource(
        api_token=emulator.token, base_url=emulator.base_url, adopt_window_s=5.0
    ).get_client()
    mine = client.create(SKETCHER, same)
    orphan = client.create(SKETCHER, same)
    other_fleet = client.create(FLEET, same)
    plain = client.create(SKETCH, same)
    with session_scope(engine) as session:
        gens.record_prediction(
            session, gid, mine.id, mine.model, mine.version, attempt=1, how="adopted"
        )
        started = session.get(CreateAttempt, (gid, 1)).started_at  # type: ignore[union-attr]
    canceled = adoption.cancel_orphans(engine, client, since=started, log=lambda _: None)
    assert canceled == [orphan.id]
    status: dict[str, Any] = {p["id"]: p["status"] for p in emulator.predictions()}
    assert status[orphan.id] == "canceled"
    for kept in (mine.id, other_fleet.id, plain.id):
        assert status[kept] in ("starting", "processing"), kept


@pytest.mark.parametrize(
    ("models", "tag"),
    [
        ([SKETCHER], SKETCHER),
        ([SKETCHER, SKETCHER], SKETCHER),
        ([f"{SKETCH}:abc", SKETCH], SKETCH),
        ([SKETCHER, SKETCH], "mixed"),
        (["not a model:v"], "not a model"),
    ],
)
def test_a_batch_run_is_tagged_with_the_deployment(models: list[str], tag: str) -> None:
    """Regression: the model tag cut every reference at its first ':', so each deployment's
    run was tagged ``deployment``."""
    rows = [
        Generation(id=i + 1, attempt=1, user_id="ed", model=model, input={}, priority=0)
        for i, model in enumerate(models)
    ]
    request = run_request_for("gen-1-a1", rows)
    assert request.tags[RunTag.MODEL] == tag
