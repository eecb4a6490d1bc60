"""What Dagster's run retries (``run_retries`` in ``dagster.yaml``) will do with a failed run.

The refund paths must not settle the generations of a run that Dagster is about to re-execute:
the retry resumes them, holds and predictions kept. Dagster answers that question inside its
retry daemon only, so this module asks the same function the daemon uses.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from dagster import DagsterInstance, DagsterRun, DagsterRunStatus, RunsFilter
from dagster._core.storage.tags import PARENT_RUN_ID_TAG, WILL_RETRY_TAG
from dagster._daemon.auto_run_reexecution.auto_run_reexecution import should_retry

#: A run Dagster tagged for a retry that has no retry run after this long will not get one (its
#: failure event can be missed by Dagster's retry daemon): the project resumes its batch.
RETRY_OVERDUE_AFTER = timedelta(minutes=2)


def will_be_retried(instance: DagsterInstance, run: DagsterRun) -> bool:
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


def retry_overdue(instance: DagsterInstance, run: DagsterRun, now: datetime) -> bool:
    """Whether Dagster decided to retry this finished run but no retry run appeared in time."""
    record = instance.get_run_record_by_id(run.run_id)
    if record is None or now - record.update_timestamp < RETRY_OVERDUE_AFTER:
        return False
    children = instance.get_runs(filters=RunsFilter(tags={PARENT_RUN_ID_TAG: run.run_id}))
    return not children
