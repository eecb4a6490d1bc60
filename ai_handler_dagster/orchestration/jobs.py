"""The jobs: what a generation run does, reprocessing (Launchpad and backfills), reconciliation."""

import contextlib
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from dagster import (
    Config,
    DailyPartitionsDefinition,
    OpExecutionContext,
    in_process_executor,
    job,
    multiprocess_executor,
    op,
)
from dagster._core.storage.dagster_run import DagsterRunStatus, RunsFilter
from pydantic import Field

from ai_handler_dagster import adoption, ledger, settings
from ai_handler_dagster import generations as gens
from ai_handler_dagster.db.engine import session_scope
from ai_handler_dagster.db.models import Generation
from ai_handler_dagster.errors import DEADLINE_EXCEEDED, RUN_FAILED, GenerationError
from ai_handler_dagster.orchestration.hooks import refund_on_failure
from ai_handler_dagster.orchestration.ops import (
    await_predictions,
    create_predictions,
    finalize,
    reserve_credits,
    store_outputs,
)
from ai_handler_dagster.orchestration.recovery import (
    BATCH_TAG,
    refund_unfinished,
    resume_batch,
    retry_overdue,
    will_be_retried,
)
from ai_handler_dagster.resources.database import DatabaseResource
from ai_handler_dagster.resources.replicate import ReplicateResource
from ai_handler_dagster.webhooks import store as webhook_store

ONE_MICROSECOND = timedelta(microseconds=1)

#: Partitions of the reprocessing job: one per day of generation requests (UTC). The current day
#: is a partition too (``end_offset=1``): failures of today are the ones an operator most often
#: wants to reprocess, and without it today's key only appears once the day is over.
REQUEST_DAYS = DailyPartitionsDefinition(start_date="2026-01-01", timezone="UTC", end_offset=1)


@job(
    executor_def=in_process_executor
    if settings.executor() == "in_process"
    else multiprocess_executor,
    hooks={refund_on_failure},
    tags={"ai_handler/kind": "generation"},
    description=(
        "Charge, generate, store and settle a batch of generations: hold credits, run the model "
        "on Replicate, store the outputs in S3, capture the charge. Failures refund."
    ),
)
def generation_job() -> None:
    held = reserve_credits()
    created = create_predictions(held)
    awaited = await_predictions(created)
    finalize(store_outputs(awaited), awaited)


class ReprocessDayConfig(Config):
    """What a reprocessing backfill re-queues for one day of requests."""

    include_succeeded: bool = Field(
        default=False,
        description="Also re-run generations that succeeded (a new attempt, charged again).",
    )


def _requeue(engine: sa.Engine, ids: list[int], *, include_succeeded: bool) -> list[int]:
    statuses = ["failed", "canceled"] + (["succeeded"] if include_succeeded else [])
    requeued = []
    for generation_id in ids:
        with session_scope(engine) as session:
            row = session.get(Generation, generation_id, with_for_update=True)
            if row is None or row.status not in statuses:
                continue
            gens.requeue(session, generation_id, include_succeeded=include_succeeded)
            requeued.append(generation_id)
    return requeued


def day_of_requests(day: datetime, statuses: list[str]) -> sa.Select[int]:
    """Ids of the generations requested on ``day`` (UTC) with one of ``statuses``; the range on
    ``created_at`` uses its index (``ix_generations_created_at``)."""
    return (
        sa.select(Generation.id)
        .where(
            # Open bounds one microsecond outside the day: on SQLite, timestamps an application
            # wrote with CURRENT_TIMESTAMP have no fraction and compare as text, so
            # "<day> 00:00:00" sorts below "<day> 00:00:00.000000".
            Generation.created_at > day - ONE_MICROSECOND,
            Generation.created_at <= day + timedelta(days=1) - ONE_MICROSECOND,
            Generation.status.in_(statuses),
        )
        .order_by(Generation.id)
    )


@op
def requeue_day(
    context: OpExecutionContext, config: ReprocessDayConfig, database: DatabaseResource
) -> list[int]:
    """Re-queue the failed (and, if asked, succeeded) generations requested on this day."""
    day = datetime.fromisoformat(context.partition_key).replace(tzinfo=UTC)
    engine = database.engine()
    statuses = ["failed", "canceled"] + (["succeeded"] if config.include_succeeded else [])
    with session_scope(engine) as session:
        ids = list(session.scalars(day_of_requests(day, statuses)))
    requeued = _requeue(engine, ids, include_succeeded=config.include_succeeded)
    context.add_output_metadata({"day": context.partition_key, "requeued": len(requeued)})
    context.log.info(f"re-queued {len(requeued)} generations of {context.partition_key}")
    return requeued


@job(
    executor_def=in_process_executor,
    partitions_def=REQUEST_DAYS,
    description="Backfill over request days: re-queue the failed generations of each day.",
)
def reprocess_day_job() -> None:
    requeue_day()


class ReprocessIdsConfig(Config):
    """Generations to re-queue, by id (from the Launchpad)."""

    generation_ids: list[int] = Field(description="Ids of failed or canceled generations.")
    include_succeeded: bool = Field(
        default=False, description="Also re-run listed generations that succeeded (charged again)."
    )


@op
def requeue_ids(
    context: OpExecutionContext, config: ReprocessIdsConfig, database: DatabaseResource
) -> list[int]:
    """Re-queue the listed generations (new attempt, new hold); others are reported and skipped."""
    requeued = _requeue(
        database.engine(), config.generation_ids, include_succeeded=config.include_succeeded
    )
    skipped = sorted(set(config.generation_ids) - set(requeued))
    if skipped:
        context.log.warning(f"not re-queued (not failed/canceled or unknown): {skipped}")
    context.add_output_metadata({"requeued": len(requeued), "skipped": str(skipped)})
    return requeued


@job(executor_def=in_process_executor, description="Re-queue given generations by id.")
def reprocess_generations_job() -> None:
    requeue_ids()


#: How far back each reconciliation looks for orphan predictions (it runs every 5 minutes).
ORPHAN_LOOKBACK = timedelta(minutes=15)

#: A queued generation whose batch has no run after this long is considered lost.
LOST_BATCH_AFTER = timedelta(minutes=10)


@op
def reconcile(
    context: OpExecutionContext, database: DatabaseResource, replicate: ReplicateResource
) -> dict[str, int]:
    """Settle what every other path missed: expired holds, and unfinished generations whose run
    has ended (or never existed); cancel orphan predictions; prune webhook records older than
    ``webhooks.store.RETENTION``. Predictions still running on Replicate are canceled."""
    engine = database.engine()
    now = datetime.now(UTC)

    # 1. Holds past their deadline: expire them and fail their generations.
    with session_scope(engine) as session:
        expired = ledger.expire(session)
        expired_gens = [h.generation_id for h in expired if h.generation_id is not None]
    for generation_id in expired_gens:
        refund_unfinished_one(engine, replicate, generation_id)

    # 2. Unfinished generations whose run is over or missing.
    with session_scope(engine) as session:
        batches = session.execute(
            sa.select(Generation.batch_key, sa.func.min(Generation.queued_at))
            .where(Generation.status.in_(("queued", "running")), Generation.batch_key.is_not(None))
            .group_by(Generation.batch_key)
            .limit(500)
        ).all()
    settled = resumed_count = 0
    for batch_key, queued_at in batches:
        runs = context.instance.get_runs(filters=RunsFilter(tags={BATCH_TAG: str(batch_key)}))
        if any(not run.is_finished for run in runs):
            continue
        if runs and will_be_retried(context.instance, runs[0]):
            if not retry_overdue(context.instance, runs[0], now):
                continue  # Dagster is about to re-execute it; the retry resumes these generations
            resumed = resume_batch(engine, str(batch_key))
            if resumed is not None:
                new_key, ids = resumed
                context.log.warning(
                    f"run {runs[0].run_id} was to be retried but no retry came: batch "
                    f"{batch_key} resumed as {new_key} ({len(ids)} generations)"
                )
                resumed_count += len(ids)
                continue
        if not runs and queued_at is not None and now - queued_at < LOST_BATCH_AFTER:
            continue  # the sensor may still be launching it
        ended = runs[0].status.value if runs else "missing"
        settled += len(
            refund_unfinished(
                engine,
                batch_key=batch_key,
                code=RUN_FAILED,
                message=f"run of batch {batch_key} is {ended}; settled by reconciliation",
                status="canceled"
                if runs and runs[0].status == DagsterRunStatus.CANCELED
                else "failed",
                cancel_prediction=replicate.get_client().cancel,
            )
        )
    # 3. Orphans: running predictions one of our attempts made that no attempt owns.
    try:
        orphans = adoption.cancel_orphans(
            engine, replicate.get_client(), since=now - ORPHAN_LOOKBACK, log=context.log.warning
        )
    except GenerationError as exc:  # the provider's list is unreadable now: next time
        context.log.warning(f"orphan sweep skipped: {exc}")
        orphans = []
    # 4. What webhooks reported, once nobody will read it again.
    deliveries, states = webhook_store.prune(engine)
    result = {
        "expired_holds": len(expired),
        "settled_generations": settled,
        "resumed_generations": resumed_count,
        "canceled_orphans": len(orphans),
        "pruned_webhook_records": deliveries + states,
    }
    context.add_output_metadata(result)
    return result


def refund_unfinished_one(engine: sa.Engine, replicate: ReplicateResource, gid: int) -> None:
    with session_scope(engine) as session:
        row = session.get(Generation, gid)
        prediction_id = row.prediction_id if row else None
    if prediction_id:
        # Best effort: reconciliation tries again on its next run.
        with contextlib.suppress(Exception):
            replicate.get_client().cancel(prediction_id)
    with session_scope(engine) as session:
        gens.fail(session, gid, code=DEADLINE_EXCEEDED, message="credit hold expired")


@job(executor_def=in_process_executor, description="Settle stuck generations and expired holds.")
def reconcile_job() -> None:
    reconcile()
