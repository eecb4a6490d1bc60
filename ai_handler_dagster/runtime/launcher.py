"""Run launcher for a single host: runs start warm, and dead workers are noticed at once.

Dagster's ``DefaultRunLauncher`` asks the code server to start each run, and the code server starts
a fresh interpreter for it (``multiprocessing`` "spawn"), which imports Dagster, boto3 and the
project before the first op runs: 2 to 5 seconds of wall time and 2 to 3 CPU-seconds per run, the
largest part of a short run's latency and, with many runs, of the machine's CPU. It also cannot tell
when that process dies: a run whose worker was killed stays ``STARTED`` until the maximum runtime.

``LocalRunLauncher`` keeps a warm parent instead: a ``multiprocessing`` fork server that imported
Dagster and the project once (``preload_modules``). Each run is a child forked from it, which
executes the run exactly as ``dagster api execute_run`` does (same events, same interrupt
handling), so starting a run costs a fork. The worker records its pid in the run's event log
(Dagster's "Started process" engine event; the ``ai_handler/worker_pid`` tag only shows it), and
the launcher reports the worker dead as soon as that process is gone (or the pid belongs to a
process older than the run: reused), so run monitoring fails the run within one poll and the refund
sensor (or a run retry) takes over. Terminating a run sends the worker SIGTERM, which Dagster
turns into an interrupt of the step.

Before a launcher process starts its first run of a job, it gives each concurrency pool of the
job its limit row at the instance's ``default_limit`` (``prepare_pools``). Dagster creates that row
lazily, in the first run worker that claims a slot, and on PostgreSQL its creation fails whenever
the row already exists (the insert's IntegrityError aborts the transaction, and the update meant to
follow fails with it). So without this, two runs that reach the pool together on a fresh database
race and one of them fails, and after ``default_limit`` changes every run that claims the pool
fails. Prepared from the one launching process, the workers find nothing left to create.

When a source file of a preloaded package changes, the fork server is restarted before the next
launch, so a reloaded code location runs new code. With ``warm_start: false``, or for a code
location that runs on another Python executable, runs go through the code server as Dagster's
default launcher does (the pid check still applies).

Use it only where the daemon runs on the same machine as the run workers (the embedded setup, a
single host). Multi-machine deployments use Dagster's Kubernetes, ECS or Docker launchers, which
check worker health themselves.
"""

from __future__ import annotations

import importlib.util
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import sys
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from dagster import DagsterEventType, Field
from dagster._core.launcher import CheckRunHealthResult, LaunchRunContext, WorkerStatus
from dagster._core.launcher.default_run_launcher import DefaultRunLauncher
from dagster._core.storage.dagster_run import DagsterRun

from ai_handler_dagster.domain import RunTag

log = logging.getLogger(__name__)


#: Modules the fork server imports once, so that runs start with them loaded.
DEFAULT_PRELOAD = (
    "dagster",
    "dagster_postgres",
    "dagster_aws.s3",
    "boto3",
    "replicate",
    "ai_handler_dagster.definitions",
)


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


def process_started_at(pid: int) -> float | None:
    """Epoch seconds at which process ``pid`` started (from ``/proc``), or None if unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            ticks = int(stat.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        with open("/proc/stat", encoding="ascii") as system:
            boot = next(int(line.split()[1]) for line in system if line.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


#: Clock slack when comparing a process's start with its run's creation (``/proc`` counts
#: start times in clock ticks, and a run record's timestamp is written just before the launch).
_PID_START_SLACK_S = 2.0


def recorded_worker_pid(instance: Any, run_id: str) -> int | None:
    """The pid a run's worker recorded in the event log when it started (Dagster's "Started
    process for run" engine event, which every launch path writes), or None if not yet."""
    records = instance.get_records_for_run(
        run_id, of_type=DagsterEventType.ENGINE_EVENT, limit=50
    ).records
    for record in records:
        event = record.event_log_entry.dagster_event
        data = getattr(event, "engine_event_data", None) if event else None
        pid = data.metadata.get("pid") if data and data.metadata else None
        if pid is not None:
            return int(pid.value)
    return None


def prepare_pools(instance: Any, pools: Iterable[str]) -> list[str]:
    """Give each pool its limit row at the instance's ``default_limit``; return those created or
    reset to it. Pools an operator set explicitly (``dagster instance concurrency set``), and pools
    already at the default, are left as they are. Does nothing without a default limit."""
    storage = instance.event_log_storage
    default = instance.global_op_concurrency_default_limit
    if default is None or not storage.supports_global_concurrency_limits:
        return []
    limits = _pool_limits(storage)
    changed = []
    for pool in sorted(set(pools)):
        current = limits.get(pool)
        if current is None:
            try:
                storage.initialize_concurrency_limit_to_default(pool)
            except Exception:
                # A run worker launched by an earlier launcher process may have created it now.
                now = _pool_limits(storage).get(pool)
                if now is None or now.limit != default:
                    raise
        elif current.from_default and current.limit != default:
            _reset_to_default(storage, pool, default)
        else:
            continue
        log.info(
            "pool %r: limit %s -> %s (default_limit)",
            pool,
            "none" if current is None else current.limit,
            default,
        )
        changed.append(pool)
    return changed


def _pool_limits(storage: Any) -> dict[str, Any]:
    """Pool name -> its ``PoolLimit`` (limit, and whether it follows ``default_limit``)."""
    return {limit.name: limit for limit in storage.get_pool_limits()}


def _reset_to_default(storage: Any, pool: str, default: int) -> None:
    """Move a pool that follows ``default_limit`` to a new default.

    Dagster's own path for this (``initialize_concurrency_limit_to_default`` on an existing row)
    fails on PostgreSQL. ``set_concurrency_slots`` resizes the slots correctly under the row's lock,
    slots held by running steps included, but records the limit as set by an operator; the row is
    then marked as following the default again, so that the next change of ``default_limit``
    applies too.
    """
    from dagster._core.storage.event_log.schema import ConcurrencyLimitsTable

    storage.set_concurrency_slots(pool, default)
    if storage.has_default_pool_limit_col:
        with storage.index_transaction() as conn:
            conn.execute(
                ConcurrencyLimitsTable.update()
                .where(ConcurrencyLimitsTable.c.concurrency_key == pool)
                .values(using_default_limit=True)
            )


def source_fingerprint(modules: Sequence[str]) -> float:
    """Newest modification time of the Python sources of the project's preloaded packages.

    Only packages outside site-packages count (the code a developer edits); installed libraries
    change only with a new deployment, which restarts the daemon anyway.
    """
    newest = 0.0
    seen: set[Path] = set()
    for name in modules:
        top = name.split(".", 1)[0]
        try:
            spec = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.submodule_search_locations:
            continue
        for location in spec.submodule_search_locations:
            root = Path(location)
            if root in seen or "site-packages" in root.parts:
                continue
            seen.add(root)
            for path in root.rglob("*.py"):
                try:
                    newest = max(newest, path.stat().st_mtime)
                except OSError:
                    continue
    return newest


def run_worker(run_id: str, serialized_instance_ref: str) -> None:
    """Body of a forked run worker: execute one run, as ``dagster api execute_run`` does."""
    from dagster._core.definitions.reconstruct import ReconstructableJob
    from dagster._core.events import EngineEventData
    from dagster._core.instance import DagsterInstance, InstanceRef
    from dagster._core.origin import JobPythonOrigin
    from dagster._grpc.impl import core_execute_run
    from dagster._serdes import deserialize_value
    from dagster._utils.error import serializable_error_info_from_exc_info
    from dagster._utils.hosted_user_process import recon_job_from_origin
    from dagster._utils.interrupts import capture_interrupts

    with capture_interrupts():
        instance_ref = deserialize_value(serialized_instance_ref, InstanceRef)
        with DagsterInstance.from_ref(instance_ref) as instance:
            run = instance.get_run_by_id(run_id)
            if run is None:
                raise RuntimeError(f"run {run_id} not found in the run storage")
            pid = os.getpid()
            try:
                origin = run.job_code_origin
                if not isinstance(origin, JobPythonOrigin):
                    raise RuntimeError(f"run {run_id} has no Python origin to load its job from")
                recon_job: ReconstructableJob = recon_job_from_origin(origin)
            except Exception:
                error = serializable_error_info_from_exc_info(sys.exc_info())
                instance.report_engine_event(
                    f"Run worker (pid: {pid}) could not load the job.",
                    run,
                    EngineEventData.engine_error(error),
                )
                instance.report_run_failed(run)
                return
            instance.report_engine_event(
                f"Started process for run (pid: {pid}).", run, EngineEventData.in_process(pid)
            )
            try:
                for _event in core_execute_run(recon_job, run, instance, inject_env_vars=True):
                    pass
            except Exception:
                pass  # core_execute_run wrote the failure to the event log before raising
            finally:
                instance.report_engine_event(f"Process for run exited (pid: {pid}).", run)


class LocalRunLauncher(DefaultRunLauncher):
    """Forks each run from a warm process and checks run workers' health by pid."""

    def __init__(
        self,
        inst_data: Any = None,
        warm_start: bool = True,
        preload_modules: Sequence[str] = DEFAULT_PRELOAD,
    ) -> None:
        super().__init__(inst_data=inst_data)
        self.warm_start = warm_start
        self.preload_modules = list(preload_modules)
        self._lock = threading.Lock()
        self._fingerprint: float | None = None
        self._workers: dict[str, multiprocessing.process.BaseProcess] = {}
        #: Execution plans whose pools this process has prepared (``prepare_pools``).
        self._plans_prepared: set[str] = set()

    @classmethod
    def config_type(cls) -> dict[str, Field]:
        return {
            "warm_start": Field(
                bool,
                is_required=False,
                default_value=True,
                description="Fork runs from a warm process (true) or start them through the code "
                "server, one fresh interpreter per run (false).",
            ),
            "preload_modules": Field(
                [str],
                is_required=False,
                default_value=list(DEFAULT_PRELOAD),
                description="Modules the warm process imports once.",
            ),
        }

    @classmethod
    def from_config_value(cls, inst_data: Any, config_value: Mapping[str, Any]) -> LocalRunLauncher:
        return cls(inst_data=inst_data, **config_value)

    # -- launching ---------------------------------------------------------------------------

    def _can_fork(self, run: DagsterRun) -> bool:
        origin = run.job_code_origin
        if not self.warm_start or origin is None:
            return False
        executable = origin.repository_origin.executable_path
        # Only code that runs on this interpreter can be forked from it. Paths are compared as
        # given, not resolved: two virtualenvs link to one interpreter but hold other packages.
        return not executable or os.path.abspath(executable) == os.path.abspath(sys.executable)

    def _context(self) -> Any:
        """The fork-server context, restarted first if the project's sources changed."""
        context = multiprocessing.get_context("forkserver")
        fingerprint = source_fingerprint(self.preload_modules)
        if self._fingerprint is not None and fingerprint != self._fingerprint:
            self._stop_fork_server()
        self._fingerprint = fingerprint
        context.set_forkserver_preload(self.preload_modules)
        return context

    def warm_up(self) -> None:
        """Start the fork server now (it imports ``preload_modules`` in the background)."""
        if self.warm_start:
            self._context()
            multiprocessing.forkserver.ensure_running()

    @staticmethod
    def _stop_fork_server() -> None:
        # The standard library has no public way to restart its fork server; a stopped one is
        # started again (with fresh imports) on the next fork.
        server = multiprocessing.forkserver._forkserver
        stop = getattr(server, "_stop", None)
        if stop is not None:
            stop()

    def _prepare_pools(self, run: DagsterRun) -> None:
        """Prepare the pools of the run's job, once per execution plan (callers hold the lock)."""
        plan_id = run.execution_plan_snapshot_id
        if plan_id is None or plan_id in self._plans_prepared:
            return
        try:
            plan = self._instance.get_execution_plan_snapshot(plan_id)
            prepare_pools(self._instance, {step.pool for step in plan.steps if step.pool})
        except Exception:
            # Never stop a launch over it: the worker still creates the row itself on first use.
            log.warning(
                "could not prepare the concurrency pools of run %s", run.run_id, exc_info=True
            )
            return
        self._plans_prepared.add(plan_id)

    def launch_run(self, context: LaunchRunContext) -> None:
        run = context.dagster_run
        with self._lock:
            self._prepare_pools(run)
        if not self._can_fork(run):
            super().launch_run(context)
            return
        ref = self._instance.get_ref()
        from dagster._serdes import serialize_value

        with self._lock:
            self._reap()
            try:
                worker = self._start_worker(run.run_id, serialize_value(ref))
            except (OSError, EOFError):
                # The fork server died (killed along with something else): start a new one.
                self._stop_fork_server()
                worker = self._start_worker(run.run_id, serialize_value(ref))
            self._workers[run.run_id] = worker
        assert worker.pid is not None
        self._instance.add_run_tags(run.run_id, {RunTag.WORKER_PID: str(worker.pid)})

    def _start_worker(self, run_id: str, ref: str) -> multiprocessing.process.BaseProcess:
        worker = self._context().Process(
            target=run_worker, args=(run_id, ref), name=f"dagster-run-{run_id[:8]}", daemon=False
        )
        worker.start()
        return worker

    def _reap(self) -> None:
        """Forget workers that ended (their exit status was collected by the fork server)."""
        for run_id, worker in list(self._workers.items()):
            if not worker.is_alive():
                worker.close()
                del self._workers[run_id]

    # -- termination and health --------------------------------------------------------------

    def terminate(self, run_id: str) -> bool:
        if not self.has_instance:
            return False
        run = self._instance.get_run_by_id(run_id)
        if run is None or run.is_finished:
            return False
        pid = self._worker_pid(run)
        if pid is None:
            return super().terminate(run_id)
        if not self._is_this_runs_process(run, pid):
            self._instance.report_engine_event(
                f"Process {pid} is not this run's worker (it started before the run); "
                "nothing was signalled.",
                run,
            )
            return False
        self._instance.report_run_canceling(run)
        try:
            # Dagster's worker turns SIGTERM into an interrupt of the running step.
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            self._instance.report_engine_event(
                f"Run worker {pid} was already gone when termination was requested.", run
            )
            return False
        return True

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def _worker_pid(self, run: DagsterRun) -> int | None:
        """The run's worker pid as the launcher knows it (a worker it forked) or as the worker
        itself recorded it in the run's event log; never the ``ai_handler/worker_pid`` tag
        alone, which anyone can set from the Launchpad and which a retried run copies."""
        with self._lock:
            worker = self._workers.get(run.run_id)
        if worker is not None and worker.pid is not None:
            return worker.pid
        return recorded_worker_pid(self._instance, run.run_id)

    def _is_this_runs_process(self, run: DagsterRun, pid: int) -> bool:
        """False for a process that started before the run existed: its pid was reused."""
        record = self._instance.get_run_record_by_id(run.run_id)
        started = process_started_at(pid)
        if record is None or started is None:
            return True  # nothing to compare with: trust the pid
        return started >= record.create_timestamp.timestamp() - _PID_START_SLACK_S

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        pid = self._worker_pid(run)
        if pid is None:
            # Not recorded yet: the worker is starting. The maximum runtime still bounds it.
            return CheckRunHealthResult(WorkerStatus.RUNNING, "worker pid not recorded yet")
        if process_alive(pid) and self._is_this_runs_process(run, pid):
            return CheckRunHealthResult(WorkerStatus.RUNNING)
        return CheckRunHealthResult(WorkerStatus.FAILED, f"run worker process {pid} is gone")

    def dispose(self) -> None:
        with self._lock:
            self._reap()
        super().dispose()
