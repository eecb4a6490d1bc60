"""Refunds for generations whose run cannot finish them.

Four paths lead here, and all of them may fire for the same generation: the failure hook (an op
failed for good), the run-failure sensor (the run failed, or its worker crashed and run monitoring
gave up on it), the run-canceled sensor, and the reconciliation schedule (anything the others
missed). Exactly one refund happens because ``generations.fail`` releases a hold only while it is
pending, under a row lock, in the same transaction that marks the generation terminal.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from dagster._core.storage.dagster_run import DagsterRun, DagsterRunStatus, RunsFilter
from dagster._core.storage.tags import PARENT_RUN_ID_TAG, WILL_RETRY_TAG
from dagster._daemon.auto_run_reexecution.auto_run_reexecution import should_retry

import ai_handler_dagster.generations as gens
from ai_handler_dagster.db.engine import session_scope
from ai_handler_dagster.db.models import Generation

log = logging.getLogger(__name__)

#: Run tag carrying the batch key (the sensor's run key) of the generations a run processes.
BATCH_TAG = "ai_handler/batch"

UNFINISHED = ("queued", "running")


def will_be_retried(instance: Any, run: DagsterRun) -> bool:
    """Whether Dagster will re-execute this run (``run_retries``), which resumes its generations,
    so no refund path may settle them.

    Dagster stores a run's failure first and tags it ``dagster/will_retry`` in a second write, by
    whichever process reported the failure; a sensor or reconciliation can see the run in
    between. A run without the tag is therefore decided the way Dagster's retry daemon decides
    it (which also writes the tag), never taken as "not retried".
    """
    run = instance.get_run_by_id(run.run_id) or run
    tag = run.tags.get(WILL_RETRY_TAG)
    if tag is not None:
        return tag == "true"
    if run.status != DagsterRunStatus.FAILURE or not instance.run_retries_enabled:
        return False
    return bool(should_retry(run, instance))


#: A run Dagster tagged for a retry that has no retry run after this long will not get one (its
#: failure event can be missed by Dagster's retry daemon): the project resumes its batch.
RETRY_OVERDUE_AFTER = timedelta(minutes=2)
#: How often a batch is resumed that way before its generations are refunded instead.
MAX_RESUMES = 3


def retry_overdue(instance: Any, run: DagsterRun, now: datetime) -> bool:
    """Whether Dagster decided to retry this finished run but no retry run appeared in time."""
    record = instance.get_run_record_by_id(run.run_id)
    if record is None or now - record.update_timestamp < RETRY_OVERDUE_AFTER:
        return False
    children = instance.get_runs(filters=RunsFilter(tags={PARENT_RUN_ID_TAG: run.run_id}))
    return not children


def resume_batch(engine: sa.Engine, batch_key: str) -> tuple[str, list[int]] | None:
    """Requeue a batch's unfinished generations under a new batch key (``<key>-r<n>``), with
    their holds, predictions and attempts, for the request sensor to start a new run; None once
    the batch was resumed ``MAX_RESUMES`` times (its generations are then refunded)."""
    base, sep, count = batch_key.rpartition("-r")
    if not (sep and count.isdigit()):
        base, count = batch_key, "0"
    if int(count) >= MAX_RESUMES:
        return None
    new_key = f"{base}-r{int(count) + 1}"
    resumed = []
    for generation_id, _attempt, _prediction in unfinished_generations(engine, batch_key=batch_key):
        with session_scope(engine) as session:
            if gens.resume(session, generation_id, batch_key=new_key):
                resumed.append(generation_id)
    return new_key, resumed


def unfinished_generations(
    engine: sa.Engine, *, run_id: str | None = None, batch_key: str | None = None
) -> list[tuple[int, int, str | None]]:
    """(id, attempt, prediction id) of the unfinished generations of a run or of a batch."""
    matches = []
    if run_id:
        matches.append(Generation.dagster_run_id == run_id)
    if batch_key:
        matches.append(Generation.batch_key == batch_key)
    if not matches:
        return []
    with session_scope(engine) as session:
        rows = session.execute(
            sa.select(Generation.id, Generation.attempt, Generation.prediction_id)
            .where(Generation.status.in_(UNFINISHED), sa.or_(*matches))
            .order_by(Generation.id)
        ).all()
    return [(row[0], row[1], row[2]) for row in rows]


def refund_unfinished(
    engine: sa.Engine,
    *,
    run_id: str | None = None,
    batch_key: str | None = None,
    code: str,
    message: str,
    status: str = "failed",
    cancel_prediction: Callable[[str], object] | None = None,
) -> list[int]:
    """Fail every unfinished generation of a run (or batch) and release its hold.

    Predictions still running on Replicate are canceled first (best effort: a prediction that
    cannot be canceled now is caught by the reconciliation schedule). Returns the ids this call
    refunded; ids another path already settled are left alone.
    """
    refunded: list[int] = []
    for generation_id, attempt, prediction_id in unfinished_generations(
        engine, run_id=run_id, batch_key=batch_key
    ):
        if prediction_id and cancel_prediction is not None:
            try:
                cancel_prediction(prediction_id)
            except Exception as exc:  # the refund must not depend on the provider being up
                log.warning("could not cancel prediction %s: %s", prediction_id, exc)
        # The attempt read above only: one requeued and restarted meanwhile is not this run's.
        with session_scope(engine) as session:
            try:
                ended = gens.fail(
                    session,
                    generation_id,
                    code=code,
                    message=message,
                    status=status,
                    attempt=attempt,
                )
            except gens.AttemptMismatch:
                continue
        if ended:
            refunded.append(generation_id)
    return refunded
