"""Reprocessing: operators re-queue failed generations, by day of request (a backfill over the
``REQUEST_DAYS`` partitions) or by id (the Launchpad). A requeued generation starts a new attempt
with a new hold; the request sensor runs it like any new request."""

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from dagster import (
    Config,
    DailyPartitionsDefinition,
    OpExecutionContext,
    in_process_executor,
    job,
    op,
)
from pydantic import Field

from ai_handler_dagster import generations as gens
from ai_handler_dagster.db.engine import session_scope
from ai_handler_dagster.db.models import Generation
from ai_handler_dagster.domain import UNSUCCESSFUL, GenerationStatus
from ai_handler_dagster.resources.database import DatabaseResource

ONE_MICROSECOND = timedelta(microseconds=1)

#: Partitions of the reprocessing job: one per day of generation requests (UTC). The current day
#: is a partition too (``end_offset=1``): failures of today are the ones an operator most often
#: wants to reprocess, and without it today's key only appears once the day is over.
REQUEST_DAYS = DailyPartitionsDefinition(start_date="2026-01-01", timezone="UTC", end_offset=1)


class ReprocessDayConfig(Config):
    """What a reprocessing backfill re-queues for one day of requests."""

    include_succeeded: bool = Field(
        default=False,
        description="Also re-run generations that succeeded (a new attempt, charged again).",
    )


def _requeueable(include_succeeded: bool) -> list[str]:
    return [*UNSUCCESSFUL, *([GenerationStatus.SUCCEEDED] if include_succeeded else [])]


def _requeue(engine: sa.Engine, ids: list[int], *, include_succeeded: bool) -> list[int]:
    statuses = _requeueable(include_succeeded)
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
    statuses = _requeueable(config.include_succeeded)
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
