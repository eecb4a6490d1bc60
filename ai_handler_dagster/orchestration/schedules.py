"""The reconciliation schedule: a periodic sweep for anything the fast refund paths missed."""

from __future__ import annotations

from dagster import DefaultScheduleStatus, ScheduleDefinition

from ai_handler_dagster.orchestration.jobs import reconcile_job

reconcile_schedule = ScheduleDefinition(
    name="reconcile_every_5_minutes",
    job=reconcile_job,
    cron_schedule="*/5 * * * *",
    default_status=DefaultScheduleStatus.RUNNING,
    description=(
        "Fails and refunds generations stuck in queued/running whose run ended or never started, "
        "expires holds past their deadline, and cancels their predictions on Replicate."
    ),
)
