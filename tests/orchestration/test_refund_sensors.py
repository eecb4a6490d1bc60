"""The run-failure refund sensor and Dagster's run retries.

Regression: a run worker killed mid-run is failed by Dagster and retried (``run_retries``). The
failure is written first and the ``dagster/will_retry`` tag a moment later, in a separate write
by whichever process reported the failure (on a busy machine, seconds later). The sensor used to
read a run without the tag as "not retried" and refund its generations; the retry then resumed
from the failed step, paid for work on refunded generations and failed in ``finalize`` (found
by ``ai-handler chaos``).

Reconciliation takes the same decision (regression: it settled such a batch as soon as all its
runs had finished).

Proves that the sensor, shown a failed run without the tag, decides as Dagster's retry daemon
does: it leaves the generations of a run Dagster will retry alone, and refunds those of a run
that will not be retried (retries disabled, or the retries used up), and that an explicit tag is
still obeyed.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from dagster import (
    DagsterEvent,
    DagsterEventType,
    DagsterInstance,
    DagsterRun,
    DagsterRunStatus,
    build_op_context,
    build_run_status_sensor_context,
    instance_for_test,
)
from dagster._core.storage.tags import WILL_RETRY_TAG
from dagster._core.test_utils import create_run_for_test

from ai_handler_dagster import generations as gens
from ai_handler_dagster import ledger
from ai_handler_dagster.db import upgrade
from ai_handler_dagster.db.engine import make_engine, session_scope
from ai_handler_dagster.domain import RunTag
from ai_handler_dagster.orchestration.generation import generation_job
from ai_handler_dagster.orchestration.recovery import reconcile, refund_sensors
from ai_handler_dagster.pricing import load_pricing
from ai_handler_dagster.resources.database import DatabaseResource, PricingResource
from ai_handler_dagster.resources.replicate import ReplicateResource

BATCH = "gen-1-a1"
refund_failed_runs, refund_canceled_runs = refund_sensors(generation_job)


@pytest.fixture
def app_db(sqlite_url: str) -> str:
    upgrade(sqlite_url)
    return sqlite_url


@pytest.fixture
def retrying_instance() -> Iterator[DagsterInstance]:
    with instance_for_test(overrides={"run_retries": {"enabled": True, "max_retries": 1}}) as inst:
        yield inst


@pytest.fixture
def plain_instance() -> Iterator[DagsterInstance]:
    with instance_for_test() as inst:  # run retries disabled
        yield inst


def _running_generation(app_db: str, run_id: str) -> int:
    """One generation claimed into BATCH and started by ``run_id``, holding its credits."""
    engine = make_engine(app_db)
    prices = load_pricing()
    with session_scope(engine) as session:
        ledger.grant(session, "u", 100, key="grant-u")
        row = gens.submit(
            session, user_id="u", model="demo/pixel-sketch", input={"prompt": "x"}, prices=prices
        )
        gid = row.id
    with session_scope(engine) as session:
        gens.claim_pending(session, limit=10, batch_key_fn=lambda rows: BATCH)
    with session_scope(engine) as session:
        assert gens.start_attempt(session, gid, run_id=run_id, prices=prices).status == "running"
    return gid


def _failed_run_without_tag(
    instance: DagsterInstance, tags: dict[str, str], parent: DagsterRun | None = None
) -> DagsterRun:
    """A run whose failure is recorded, as the sensor sees it before Dagster tags the retry."""
    run = create_run_for_test(
        instance,
        job_name="generation_job",
        status=DagsterRunStatus.STARTED,
        tags={RunTag.BATCH: BATCH, **tags},
        root_run_id=parent.run_id if parent else None,
        parent_run_id=parent.run_id if parent else None,
    )
    failure = DagsterEvent(
        event_type_value=DagsterEventType.RUN_FAILURE.value, job_name="generation_job"
    )
    instance.handle_run_event(run.run_id, failure)
    failed = instance.get_run_by_id(run.run_id)
    assert failed is not None and failed.status == DagsterRunStatus.FAILURE
    assert WILL_RETRY_TAG not in failed.tags or tags.get(WILL_RETRY_TAG)
    return failed


def _evaluate(instance: DagsterInstance, run: DagsterRun, app_db: str) -> None:
    failure = DagsterEvent(
        event_type_value=DagsterEventType.RUN_FAILURE.value, job_name="generation_job"
    )
    context = build_run_status_sensor_context(
        sensor_name="refund_failed_runs",
        dagster_event=failure,
        dagster_instance=instance,
        dagster_run=run,
        resources={
            "database": DatabaseResource(url=app_db),
            # Never called: these generations have no prediction to cancel.
            "replicate": ReplicateResource(api_token="r8_unused", base_url="http://127.0.0.1:9"),
        },
    ).for_run_failure()
    refund_failed_runs(context)


def _status(app_db: str, gid: int) -> str:
    with session_scope(make_engine(app_db)) as session:
        return gens.get(session, gid).status


def test_a_failed_run_dagster_will_retry_is_not_refunded_before_its_tag_is_written(
    app_db: str, retrying_instance: DagsterInstance
) -> None:
    run = _failed_run_without_tag(retrying_instance, {})
    gid = _running_generation(app_db, run.run_id)
    _evaluate(retrying_instance, run, app_db)
    assert _status(app_db, gid) == "running"  # the retry resumes it, with the same hold
    assert retrying_instance.get_run_by_id(run.run_id).tags[WILL_RETRY_TAG] == "true"  # type: ignore[union-attr]


def test_a_failed_run_whose_retries_are_used_up_is_refunded(
    app_db: str, retrying_instance: DagsterInstance
) -> None:
    parent = create_run_for_test(
        retrying_instance, job_name="generation_job", status=DagsterRunStatus.FAILURE
    )
    # A retry already (run group: the parent and this run), as Dagster tags its retries.
    lineage = {"dagster/parent_run_id": parent.run_id, "dagster/root_run_id": parent.run_id}
    run = _failed_run_without_tag(retrying_instance, lineage, parent=parent)
    gid = _running_generation(app_db, run.run_id)
    _evaluate(retrying_instance, run, app_db)
    assert _status(app_db, gid) == "failed"


def test_without_run_retries_a_failed_run_is_refunded(
    app_db: str, plain_instance: DagsterInstance
) -> None:
    run = _failed_run_without_tag(plain_instance, {})
    gid = _running_generation(app_db, run.run_id)
    _evaluate(plain_instance, run, app_db)
    assert _status(app_db, gid) == "failed"


@pytest.mark.parametrize(("tag", "expected"), [("true", "running"), ("false", "failed")])
def test_an_explicit_retry_tag_is_obeyed(
    app_db: str, retrying_instance: DagsterInstance, tag: str, expected: str
) -> None:
    run = _failed_run_without_tag(retrying_instance, {WILL_RETRY_TAG: tag})
    gid = _running_generation(app_db, run.run_id)
    _evaluate(retrying_instance, run, app_db)
    assert _status(app_db, gid) == expected


def _reconcile(instance: DagsterInstance, app_db: str) -> dict[str, int]:
    context = build_op_context(instance=instance)
    unreachable = ReplicateResource(
        api_token="r8_unused", base_url="http://127.0.0.1:9", request_attempts=1
    )
    return reconcile(
        context,
        database=DatabaseResource(url=app_db),
        replicate=unreachable,
        pricing=PricingResource(),
    )


@pytest.mark.parametrize(("tag", "expected"), [(None, "running"), ("false", "failed")])
def test_reconciliation_decides_retries_as_the_sensors_do(
    app_db: str, retrying_instance: DagsterInstance, tag: str | None, expected: str
) -> None:
    """Regression: reconciliation settled a batch once all its runs had finished, without the
    sensors' will-retry decision, so between run monitoring failing a crashed run and the retry
    daemon creating its replacement it refunded generations (and canceled predictions) that the
    retry would resume."""
    run = _failed_run_without_tag(retrying_instance, {WILL_RETRY_TAG: tag} if tag else {})
    gid = _running_generation(app_db, run.run_id)
    result = _reconcile(retrying_instance, app_db)
    assert _status(app_db, gid) == expected
    assert result["settled_generations"] == (1 if expected == "failed" else 0)


def test_a_retry_that_never_comes_is_resumed_by_a_new_run_then_refunded(
    app_db: str, retrying_instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (seen in the chaos soak, seed 1): Dagster tagged a crashed run for a retry
    (``dagster/will_retry=true``) but its retry daemon never created one (it missed the
    failure event), and every refund path deferred to the retry: six generations stayed
    ``running`` with their holds. Once the retry is overdue, reconciliation resumes the batch
    under a new key (hold, prediction and attempt kept) for the sensor to start a new run; after
    ``MAX_RESUMES`` it refunds instead."""
    from ai_handler_dagster.orchestration import recovery
    from ai_handler_dagster.runtime import run_retries

    monkeypatch.setattr(run_retries, "RETRY_OVERDUE_AFTER", timedelta(0))
    run = _failed_run_without_tag(retrying_instance, {WILL_RETRY_TAG: "true"})
    gid = _running_generation(app_db, run.run_id)
    with session_scope(make_engine(app_db)) as session:
        hold_id = gens.get(session, gid).hold_id
    result = _reconcile(retrying_instance, app_db)
    assert (result["resumed_generations"], result["settled_generations"]) == (1, 0)
    with session_scope(make_engine(app_db)) as session:
        row = gens.get(session, gid)
        assert (row.status, row.batch_key, row.attempt) == ("queued", f"{BATCH}-r1", 1)
        assert row.hold_id == hold_id and row.dagster_run_id is None
    # A batch resumed MAX_RESUMES times already is refunded.
    with session_scope(make_engine(app_db)) as session:
        gens.get(session, gid).batch_key = f"{BATCH}-r{recovery.MAX_RESUMES}"
    last = _failed_run_without_tag(
        retrying_instance,
        {WILL_RETRY_TAG: "true", RunTag.BATCH: f"{BATCH}-r{recovery.MAX_RESUMES}"},
    )
    assert last.tags[RunTag.BATCH].endswith(f"-r{recovery.MAX_RESUMES}")
    assert _reconcile(retrying_instance, app_db)["settled_generations"] == 1
    assert _status(app_db, gid) == "failed"
