"""The request sensor: pending generation requests become runs of the generation job.

The request sensor is the only writer that moves rows from ``pending`` to ``queued``. It claims a
bounded number of rows per tick, in batches whose size follows the backlog (one generation per run
when the queue is short, up to ``AI_HANDLER_MAX_BATCH`` when it is long), and names each run after
the first generation attempt of its batch, so a re-tick never launches a batch twice.

Each batch holds one priority, the highest claimable, users taking turns within it; requests
pending longer than ``AI_HANDLER_PRIORITY_AGING_S`` go first (``generations.claim_pending``).
The run carries ``dagster/priority``, so Dagster's run queue starts higher priorities first too.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from dagster import (
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from ai_handler_dagster import generations as gens
from ai_handler_dagster import settings
from ai_handler_dagster.db.engine import session_scope
from ai_handler_dagster.db.models import Generation
from ai_handler_dagster.domain import (
    IN_FLIGHT,
    MAX_PRIORITY,
    GenerationStatus,
    RunTag,
    model_base,
)
from ai_handler_dagster.orchestration.generation import GENERATION_JOB, batch_run_config
from ai_handler_dagster.resources.database import DatabaseResource
from ai_handler_dagster.runtime import wake

#: Most runs one tick launches: bounds the work of a tick whatever the backlog.
MAX_RUNS_PER_TICK = 8
#: Counting the backlog stops here: past it the batch plan no longer changes.
BACKLOG_COUNT_CAP = 10_000
#: A queued batch with no run after this long is requested again (the tick that claimed it may
#: have crashed between committing and launching; Dagster drops the repeat if the run exists).
RELAUNCH_AFTER = timedelta(seconds=30)


@dataclass(frozen=True)
class QueuePolicy:
    """How much work the sensor hands to Dagster per tick."""

    max_batch: int
    max_in_flight: int
    small_backlog: int
    max_runs_per_tick: int = MAX_RUNS_PER_TICK
    max_in_flight_per_user: int | None = None
    #: Seconds after which a pending request is claimed ahead of every priority (aging).
    aging_s: int = 600

    @classmethod
    def from_settings(cls) -> "QueuePolicy":
        return cls(
            max_batch=settings.max_batch_size(),
            max_in_flight=settings.max_in_flight(),
            small_backlog=settings.small_backlog(),
            max_in_flight_per_user=settings.max_in_flight_per_user(),
            aging_s=settings.priority_aging_s(),
        )


def plan_batches(pending: int, in_flight: int, policy: QueuePolicy) -> list[int]:
    """Sizes of the batches to launch this tick.

    A short queue gets one generation per run (lowest latency, one run per request in the UI).
    A long one gets full batches of up to ``max_batch``, as few runs as that takes (each run costs
    seconds of process start-up), never more than ``max_runs_per_tick`` runs nor more than
    ``max_in_flight`` generations queued or running. When the room left would only make a small
    batch, it waits for running batches to finish rather than launch a run for a few generations.
    """
    room = max(0, policy.max_in_flight - in_flight)
    take = min(pending, room)
    if take <= 0:
        return []
    if pending <= policy.small_backlog:
        return [1] * min(take, policy.max_runs_per_tick)
    full = min(pending, policy.max_batch)
    if in_flight > 0 and take < full // 2:
        return []
    runs = min(policy.max_runs_per_tick, math.ceil(take / policy.max_batch))
    take = min(take, runs * policy.max_batch)
    size = math.ceil(take / runs)
    batches: list[int] = []
    while take > 0:
        batches.append(min(size, take))
        take -= batches[-1]
    return batches


def batch_key_for(rows: Sequence[Generation]) -> str:
    """Run key of a batch: its first generation attempt, unique for the life of the table."""
    first = min(rows, key=lambda r: r.id)
    return f"gen-{first.id}-a{first.attempt}"


def _common(values: set[str]) -> str:
    return next(iter(values)) if len(values) == 1 else "mixed"


def run_priority(rows: Sequence[Generation], aged_before: datetime | None) -> int:
    """The ``dagster/priority`` of a batch's run: its generations' priority, or
    ``MAX_PRIORITY`` when aging claimed them (all pending since ``aged_before``), so Dagster's
    run queue does not hold them back behind higher priorities either."""
    if aged_before is not None and all(r.pending_since <= aged_before for r in rows):
        return MAX_PRIORITY
    return max(r.priority for r in rows)


def run_request_for(
    batch_key: str, rows: Sequence[Generation], *, aged_before: datetime | None = None
) -> RunRequest:
    """The run of one batch: its ids in the op config, tags for filtering in the UI and the
    priority Dagster's run queue orders runs by."""
    return RunRequest(
        run_key=batch_key,
        run_config=batch_run_config([r.id for r in rows]),
        tags={
            RunTag.BATCH: batch_key,
            RunTag.BATCH_SIZE: str(len(rows)),
            RunTag.USER: _common({r.user_id for r in rows}),
            RunTag.MODEL: _common({model_base(r.model) for r in rows}),
            RunTag.PRIORITY: _common({str(r.priority) for r in rows}),
            RunTag.DAGSTER_PRIORITY: str(run_priority(rows, aged_before)),
        },
    )


def _count(session: sa.orm.Session, *statuses: str, cap: int = BACKLOG_COUNT_CAP) -> int:
    # Counting a capped subquery keeps the cost bounded by the cap, not by the table.
    inner = sa.select(Generation.id).where(Generation.status.in_(statuses)).limit(cap).subquery()
    return int(session.scalar(sa.select(sa.func.count()).select_from(inner)) or 0)


def _stale_batches(session: sa.orm.Session, now: datetime) -> dict[str, list[Generation]]:
    rows = session.scalars(
        sa.select(Generation)
        .where(
            Generation.status == GenerationStatus.QUEUED,
            Generation.dagster_run_id.is_(None),
            Generation.queued_at < now - RELAUNCH_AFTER,
        )
        .order_by(Generation.id)
        .limit(500)
        # Inputs are not needed here, and one that is not JSON must not fail the tick.
        .options(sa.orm.defer(Generation.input))
    ).all()
    batches: dict[str, list[Generation]] = {}
    for row in rows:
        if row.batch_key:
            batches.setdefault(row.batch_key, []).append(row)
    return batches


@sensor(
    job_name=GENERATION_JOB,
    minimum_interval_seconds=settings.sensor_interval_s(),
    default_status=DefaultSensorStatus.RUNNING,
    description="Launches generation runs for pending requests, in batches sized to the backlog.",
)
def generation_request_sensor(
    context: SensorEvaluationContext, database: DatabaseResource
) -> SensorResult | SkipReason:
    engine = database.engine()
    policy = QueuePolicy.from_settings()
    now = datetime.now(UTC)
    aged_before = now - timedelta(seconds=policy.aging_s)
    requests: list[RunRequest] = []

    with session_scope(engine) as session:
        for batch_key, rows in _stale_batches(session, now).items():
            requests.append(run_request_for(batch_key, rows, aged_before=aged_before))
        pending = _count(session, GenerationStatus.PENDING)
        in_flight = _count(session, *IN_FLIGHT)
    # Whether the daemon's next wake-up may bring the next tick forward (runtime/wake.py):
    # only while the system is quiet, so that under load each tick still batches.
    quiet = pending + in_flight <= policy.small_backlog
    context.update_cursor(wake.QUIET_CURSOR if quiet else wake.BUSY_CURSOR)

    plan = plan_batches(pending, in_flight, policy)
    for size in plan:
        with session_scope(engine) as session:
            rows = gens.claim_pending(
                session,
                limit=size,
                batch_key_fn=batch_key_for,
                per_user_limit=policy.max_in_flight_per_user,
                aged_before=aged_before,
                now=now,
            )
            if not rows:
                break
            requests.append(
                run_request_for(
                    rows[0].batch_key or batch_key_for(rows), rows, aged_before=aged_before
                )
            )

    if not requests:
        if pending == 0:
            return SkipReason("No pending generation requests.")
        return SkipReason(
            f"{pending} pending, none can start now: {in_flight} in flight "
            f"(AI_HANDLER_MAX_IN_FLIGHT={policy.max_in_flight}, "
            f"AI_HANDLER_MAX_IN_FLIGHT_PER_USER={policy.max_in_flight_per_user})."
        )
    claimed = sum(int(r.tags[RunTag.BATCH_SIZE]) for r in requests)
    context.log.info(
        f"launching {len(requests)} runs for {claimed} generations "
        f"(backlog {pending}, in flight {in_flight}, batches {plan})"
    )
    return SensorResult(run_requests=requests)
