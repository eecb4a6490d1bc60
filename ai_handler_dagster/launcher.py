"""Run launcher for a single machine: Dagster's default launcher plus worker health checks.

Dagster's ``DefaultRunLauncher`` starts each run in a subprocess of the code server but cannot
tell when that process dies: a run whose worker was killed stays ``STARTED`` until the maximum
runtime passes. This launcher looks up the worker's pid (Dagster records it in an engine event when
the process starts) and reports the worker dead as soon as the process is gone, so run monitoring
fails the run within one poll and the refund sensor (or a run retry) takes over.

Use it only where the daemon runs on the same machine as the run workers (the embedded setup, a
single host). Multi-machine deployments use Dagster's Kubernetes, ECS or Docker launchers, which
check worker health themselves.
"""

from __future__ import annotations

import os
from typing import Any

from dagster import DagsterEventType
from dagster._core.launcher import CheckRunHealthResult, WorkerStatus
from dagster._core.launcher.default_run_launcher import DefaultRunLauncher
from dagster._core.storage.dagster_run import DagsterRun


def process_alive(pid: int) -> bool:
    """True if ``pid`` is a live process (a zombie waiting to be reaped counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            # Field 3 is the state; the name in field 2 may contain spaces, so split after ')'.
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True  # no /proc: trust the signal check
    return state not in ("Z", "X")


class LocalRunLauncher(DefaultRunLauncher):
    """``DefaultRunLauncher`` whose run workers' health can be checked by pid."""

    def __init__(self, inst_data: Any = None) -> None:
        super().__init__(inst_data=inst_data)
        self._pids: dict[str, int] = {}

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def _worker_pid(self, run: DagsterRun) -> int | None:
        if run.run_id in self._pids:
            return self._pids[run.run_id]
        records = self._instance.get_records_for_run(
            run.run_id, of_type=DagsterEventType.ENGINE_EVENT, limit=50
        ).records
        for record in records:
            event = record.event_log_entry.dagster_event
            data = getattr(event, "engine_event_data", None) if event else None
            pid = data.metadata.get("pid") if data and data.metadata else None
            if pid is not None:
                self._pids[run.run_id] = int(pid.value)
                return self._pids[run.run_id]
        return None

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        pid = self._worker_pid(run)
        if pid is None:
            # Not recorded yet: the worker is starting. The maximum runtime still bounds it.
            return CheckRunHealthResult(WorkerStatus.RUNNING, "worker pid not recorded yet")
        if process_alive(pid):
            return CheckRunHealthResult(WorkerStatus.RUNNING)
        self._pids.pop(run.run_id, None)
        return CheckRunHealthResult(WorkerStatus.FAILED, f"run worker process {pid} is gone")
