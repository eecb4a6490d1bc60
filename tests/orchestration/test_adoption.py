"""One paid prediction per attempt when create answers are lost, on SQLite and PostgreSQL.

The generation job runs in process against the emulator with every create answer dropped
(``drop_create_rate = 1.0``: the prediction starts, the connection is cut before the answer).
Regressions reproduced here, each failing on the adoption that picked the oldest unclaimed
prediction with the requested model name, from a set of claims read once per op:

- two identical requests in one batch: B adopted A's prediction, then on the unique-index
  conflict canceled it (A ended ``prediction_canceled``), and B's own prediction ran on, paid
  and owned by nobody;
- an identical request that had already succeeded: the new one adopted the old prediction;
- a regenerate (requeue of a succeeded generation): attempt 2 re-adopted attempt 1's
  prediction, so the user paid twice for one output, and attempt 2's real prediction was
  orphaned;
- an official model answering under another name: a lost create was never adopted, so every
  one became a second paid prediction;
- a retried create step created predictions for generations that had already failed.

Also: a prediction made on the website with the same input is never adopted nor canceled, an
orphan (one of our attempts could have made it, none owns it) is canceled, and an attempt's
first create is stamped when it is sent (after its turn at the create throttle), early enough
for the adoption window to cover the prediction a lost create made.
"""

from __future__ import annotations

import time
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from dagster import DagsterInstance, build_op_context

from ai_handler_dagster import adoption, ledger
from ai_handler_dagster import generations as gens
from ai_handler_dagster.db.engine import make_engine, session_scope
from ai_handler_dagster.db.models import CreateAttempt, Generation, utcnow
from ai_handler_dagster.devstack.emulator import EmulatorHandle, Faults
from ai_handler_dagster.devstack.s3 import LocalS3
from ai_handler_dagster.orchestration.generation import Held, create_predictions
from ai_handler_dagster.pricing import load_pricing
from ai_handler_dagster.replicate.client import ReplicateClient
from ai_handler_dagster.replicate.snapshot import parse_time
from ai_handler_dagster.resources.database import DatabaseResource, PricingResource
from ai_handler_dagster.resources.replicate import ReplicateResource
from tests.support.orchestration import grant, run_pending, submit

pytestmark = pytest.mark.usefixtures("aws_env")

SKETCH = "demo/pixel-sketch"
ALIAS = "demo/pixel-sketch-official"
SMALL = {"width": 64, "height": 64}


def _rows(app_db: str) -> dict[int, Generation]:
    with session_scope(make_engine(app_db)) as session:
        rows = list(session.scalars(sa.select(Generation)))
        session.expunge_all()
    return {r.id: r for r in rows}


def _attempts(app_db: str) -> list[CreateAttempt]:
    with session_scope(make_engine(app_db)) as session:
        rows = list(session.scalars(sa.select(CreateAttempt)))
        session.expunge_all()
    return rows


def _assert_one_paid_prediction_per_attempt(app_db: str, emulator: EmulatorHandle) -> None:
    attempts = _attempts(app_db)
    owned = [a.prediction_id for a in attempts]
    assert None not in owned and len(set(owned)) == len(owned), owned  # none shared
    paid = [p for p in emulator.predictions() if p["_emulator"]["paid"] and p["source"] == "api"]
    assert sorted(p["id"] for p in paid) == sorted(owned)  # no prediction paid for nobody
    assert all(p["status"] == "succeeded" for p in paid)
    with session_scope(make_engine(app_db)) as session:
        assert ledger.verify(session) == [] and gens.verify(session) == []


def test_every_answer_lost_identical_inputs_alias_and_regenerate(
    app_db: str, emulator: EmulatorHandle, local_s3: LocalS3, bucket: str, instance: DagsterInstance
) -> None:
    """The acceptance case: every create answer lost; a batch with identical inputs, an
    official model answering under another name, and a regenerate of a succeeded generation."""
    emulator.configure(model_aliases={SKETCH: ALIAS}, faults=Faults(drop_create_rate=1.0))
    grant(app_db, "ada", 200)
    same = {"prompt": "the same fox", "seed": 5, **SMALL}
    first = submit(app_db, "ada", [(SKETCH, same), (SKETCH, same), (SKETCH, same)])
    run_pending(app_db, emulator, local_s3, bucket, instance)
    rows = _rows(app_db)
    assert [rows[g].status for g in first] == ["succeeded"] * 3, [
        (rows[g].error_code, rows[g].error_message) for g in first
    ]
    _assert_one_paid_prediction_per_attempt(app_db, emulator)
    # The provider's answered name was learned from the adoptions.
    with session_scope(make_engine(app_db)) as session:
        assert gens.learned_model_names(session, SKETCH) == {ALIAS}

    # An identical request after those succeeded, and a regenerate of one of them.
    later = submit(app_db, "ada", [(SKETCH, same)])
    with session_scope(make_engine(app_db)) as session:
        gens.requeue(session, first[0], include_succeeded=True)
    run_pending(app_db, emulator, local_s3, bucket, instance)
    rows = _rows(app_db)
    assert rows[later[0]].status == "succeeded" and rows[first[0]].status == "succeeded"
    assert rows[first[0]].attempt == 2
    _assert_one_paid_prediction_per_attempt(app_db, emulator)
    by_generation = Counter(a.generation_id for a in _attempts(app_db))
    assert by_generation[first[0]] == 2  # attempt 1's prediction is remembered, not re-adopted
    assert len(emulator.predictions()) == 5
    with session_scope(make_engine(app_db)) as session:
        # Five paid predictions, five charges of 5 credits: two for the regenerated one.
        assert ledger.balance(session, "ada").balance == 200 - 5 * 5


def test_a_website_prediction_with_the_same_input_is_left_alone(
    app_db: str, emulator: EmulatorHandle, local_s3: LocalS3, bucket: str, instance: DagsterInstance
) -> None:
    grant(app_db, "bo", 50)
    same = {"prompt": "shared account", "seed": 2, **SMALL}
    emulator.configure(faults=Faults(drop_create_rate=1.0))
    [gid] = submit(app_db, "bo", [(SKETCH, same)])
    web = emulator.web_prediction(SKETCH, same)
    run_pending(app_db, emulator, local_s3, bucket, instance)
    row = _rows(app_db)[gid]
    assert row.status == "succeeded" and row.prediction_id != web["id"]
    theirs = {p["id"]: p for p in emulator.predictions()}[web["id"]]
    assert theirs["status"] == "succeeded"  # ran to its end: never adopted, never canceled


def test_an_orphan_is_canceled_and_nothing_else(
    app_db: str, emulator: EmulatorHandle, make_replicate_for: Any
) -> None:
    """A running prediction one of our attempts could have made and none owns is canceled;
    one with another input, one made on the website, and one a create in flight may still
    claim are not."""
    emulator.configure(latency_s=30.0)
    grant(app_db, "cy", 50)
    engine = make_engine(app_db)
    same = {"prompt": "orphan", **SMALL}
    [lost, busy] = submit(app_db, "cy", [(SKETCH, same), (SKETCH, {"prompt": "busy", **SMALL})])
    prices = load_pricing()
    for gid in (lost, busy):
        with session_scope(engine) as session:
            gens.start_attempt(session, gid, run_id="run-1", prices=prices)
            gens.begin_create(session, gid, attempt=1)
    with session_scope(engine) as session:
        gens.create_lost(session, lost, 1)
    resource: ReplicateClient = make_replicate_for()
    mine = resource.create(SKETCH, same)
    orphan = resource.create(SKETCH, same)
    with session_scope(engine) as session:
        gens.record_prediction(
            session, lost, mine.id, mine.model, mine.version, attempt=1, how="adopted"
        )
    in_flight = resource.create(SKETCH, {"prompt": "busy", **SMALL})  # busy's answer, unrecorded
    # An attempt that ended long ago, and a later prediction of its input by another app: an
    # attempt can have made predictions only while it was creating.
    [old] = submit(app_db, "cy", [(SKETCH, {"prompt": "long ago", **SMALL})])
    with session_scope(engine) as session:
        gens.start_attempt(session, old, run_id="run-0", prices=prices)
        gens.begin_create(session, old, attempt=1)
        gens.create_lost(session, old, 1)
        gens.fail(session, old, code="run_failed", message="crashed long ago")
        record = session.get(CreateAttempt, (old, 1))
        assert record is not None
        record.started_at -= timedelta(hours=1)
        record.state_at -= timedelta(hours=1)
    later_by_another_app = resource.create(SKETCH, {"prompt": "long ago", **SMALL})
    other_app = resource.create(SKETCH, {"prompt": "someone else's", **SMALL})
    web = emulator.web_prediction(SKETCH, same)
    canceled = adoption.cancel_orphans(
        engine, resource, since=_started(app_db, lost), log=lambda _: None
    )
    assert canceled == [orphan.id]
    status = {p["id"]: p["status"] for p in emulator.predictions()}
    assert status[orphan.id] == "canceled"
    for kept in (mine.id, in_flight.id, other_app.id, web["id"], later_by_another_app.id):
        assert status[kept] in ("starting", "processing"), kept


def _started(app_db: str, gid: int) -> Any:
    return next(a.started_at for a in _attempts(app_db) if a.generation_id == gid)


def test_a_retried_create_step_creates_nothing_for_failed_generations(
    app_db: str, emulator: EmulatorHandle
) -> None:
    grant(app_db, "di", 50)
    [gid] = submit(app_db, "di", [(SKETCH, {"prompt": "failed in the first try"})])
    engine = make_engine(app_db)
    with session_scope(engine) as session:
        gens.start_attempt(session, gid, run_id="run-1", prices=load_pricing())
        gens.fail(session, gid, code="invalid_input", message="refused in the first try")
    replicate = ReplicateResource(api_token=emulator.token, base_url=emulator.base_url)
    context = build_op_context()
    result = create_predictions(
        context,
        [Held(gid, 1)],
        database=DatabaseResource(url=app_db),
        replicate=replicate,
        pricing=PricingResource(),
    )
    assert result == []
    assert emulator.stats()["creates"] == 0


@pytest.fixture
def make_replicate_for(emulator: EmulatorHandle) -> Any:
    def build() -> ReplicateClient:
        return ReplicateResource(
            api_token=emulator.token, base_url=emulator.base_url, adopt_window_s=5.0
        ).get_client()

    return build


def test_the_first_create_is_stamped_when_sent_and_a_lost_one_stays_covered(
    app_db: str, emulator: EmulatorHandle, make_replicate_for: Any
) -> None:
    """Regression: ``begin_create`` stamped the attempt's first create before its turn at the
    throttle, and the first try never refreshed ``state_at``; the stamp is now written right
    before the create is sent, and a retry after a lost answer keeps it, so the adoption
    window starts before the prediction the lost create made."""
    from ai_handler_dagster.throttle import PACE, CreateThrottle, Limits

    emulator.configure(faults=Faults(drop_create_rate=1.0))
    grant(app_db, "ed", 50)
    engine = make_engine(app_db)
    [gid] = submit(app_db, "ed", [(SKETCH, {"prompt": "stamped", **SMALL})])
    with session_scope(engine) as session:
        gens.start_attempt(session, gid, run_id="run-1", prices=load_pricing())
    throttle = CreateThrottle(engine, Limits(per_minute=60 / PACE, burst=1))
    throttle.wait_turn()  # the burst: this create's turn is a second away
    asked = utcnow()
    snapshot, lost = adoption.obtain(
        engine,
        make_replicate_for(),
        adoption.Attempt(gid, 1, SKETCH, {"prompt": "stamped", **SMALL}),
        webhook=None,
        log=lambda _: None,
        pacer=throttle.pacer(time.time() + 30),
    )
    assert lost  # every answer was dropped: the prediction was found in the list
    [record] = _attempts(app_db)
    assert record.prediction_id == snapshot.id and record.how == "adopted"
    waited = (record.started_at - asked).total_seconds()
    assert waited >= 0.8  # stamped after the turn, not when the step asked for one
    made = parse_time(snapshot.raw["created_at"])
    assert made is not None and record.started_at.timestamp() <= made + 0.5
    assert len(emulator.predictions()) == 1  # one paid prediction
