"""The run launcher's own rules, without a daemon: its configuration, when it forks, and when it
restarts its warm process. The forked path itself runs in the end-to-end tests (every run of
``tests/e2e`` is forked from the warm process; the crash test checks the worker's parent).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from dagster import DagsterInstance, DagsterRunStatus, job, op
from dagster._core.code_pointer import ModuleCodePointer
from dagster._core.events import EngineEventData
from dagster._core.launcher import WorkerStatus
from dagster._core.origin import JobPythonOrigin, RepositoryPythonOrigin
from dagster._core.test_utils import create_run_for_test, instance_for_test

from ai_handler_dagster import instance
from ai_handler_dagster.domain import RunTag
from ai_handler_dagster.runtime.launcher import (
    LocalRunLauncher,
    source_fingerprint,
)


@op
def noop() -> None:
    return None


@job
def tiny_job() -> None:
    noop()


def _instance_with(tmp_path: Path, warm: bool) -> DagsterInstance:
    home = tmp_path / "home"
    config = instance.local_config(overrides={"run_launcher.config.warm_start": warm})
    instance.write(home, config)
    return DagsterInstance.from_config(str(home))


@pytest.mark.parametrize("warm", [True, False])
def test_the_instance_file_selects_warm_or_cold_starts(tmp_path: Path, warm: bool) -> None:
    with _instance_with(tmp_path, warm) as instance:
        launcher = instance.run_launcher
        assert isinstance(launcher, LocalRunLauncher)
        assert launcher.warm_start is warm
        assert "ai_handler_dagster.definitions" in launcher.preload_modules


def test_an_unknown_launcher_setting_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text(
        "run_launcher:\n  module: ai_handler_dagster.runtime.launcher\n  class: LocalRunLauncher\n"
        "  config:\n    warm_starts: true\n"
    )
    with pytest.raises(Exception, match="warm_starts"):
        DagsterInstance.from_config(str(home)).run_launcher  # noqa: B018


def test_the_fingerprint_moves_when_a_source_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "fp_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    module = package / "mod.py"
    module.write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = source_fingerprint(["fp_pkg.mod"])
    assert before > 0
    assert source_fingerprint(["fp_pkg.mod"]) == before  # nothing changed
    later = time.time() + 5
    os.utime(module, (later, later))
    assert source_fingerprint(["fp_pkg.mod"]) > before
    # Installed libraries are not watched, and unknown names are ignored.
    assert source_fingerprint(["dagster", "no_such_package_here"]) == 0.0


def _origin(executable: str) -> JobPythonOrigin:
    pointer = ModuleCodePointer("tests.test_launcher", "tiny_job", working_directory=None)
    return JobPythonOrigin("tiny_job", RepositoryPythonOrigin(executable, pointer))


def test_only_runs_on_this_interpreter_are_forked(tmp_path: Path) -> None:
    other_env = tmp_path / "venv" / "bin" / "python"  # another virtualenv's interpreter
    with instance_for_test() as instance:
        warm = LocalRunLauncher(warm_start=True)
        warm.register_instance(instance)
        here = create_run_for_test(
            instance, job_name="tiny_job", job_code_origin=_origin(sys.executable)
        )
        assert warm._can_fork(here) is True
        elsewhere = create_run_for_test(
            instance, job_name="tiny_job", job_code_origin=_origin(str(other_env))
        )
        assert warm._can_fork(elsewhere) is False
        no_origin = create_run_for_test(instance, job_name="tiny_job")
        assert warm._can_fork(no_origin) is False
        cold = LocalRunLauncher(warm_start=False)
        cold.register_instance(instance)
        assert cold._can_fork(here) is False


def _record_worker(instance: DagsterInstance, run: Any, pid: int) -> None:
    """What a worker writes when it starts: Dagster's "Started process" engine event."""
    instance.report_engine_event(
        f"Started process for run (pid: {pid}).", run, EngineEventData.in_process(pid)
    )


def test_worker_health_follows_the_pid_the_worker_recorded() -> None:
    launcher = LocalRunLauncher()
    with instance_for_test() as instance:
        launcher.register_instance(instance)
        alive = create_run_for_test(instance, job_name="tiny_job")
        worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            _record_worker(instance, alive, worker.pid)
            assert launcher.check_run_worker_health(alive).status == WorkerStatus.RUNNING
        finally:
            worker.kill()
            worker.wait()
        gone_pid = _a_finished_pid()
        gone = create_run_for_test(instance, job_name="tiny_job")
        _record_worker(instance, gone, gone_pid)
        health = launcher.check_run_worker_health(gone)
        assert health.status == WorkerStatus.FAILED
        assert f"run worker process {gone_pid} is gone" in (health.msg or "")
        unknown = create_run_for_test(instance, job_name="tiny_job")
        assert launcher.check_run_worker_health(unknown).status == WorkerStatus.RUNNING


def test_a_pid_tag_or_a_reused_pid_is_never_signalled() -> None:
    """Regression: termination sent SIGTERM to whatever pid the ``ai_handler/worker_pid`` tag
    named (settable from the Launchpad, copied onto retried runs), and health trusted it too;
    a pid recorded by a worker is also refused once it belongs to a process older than the
    run (the worker died and the pid was reused)."""
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(2.5)  # it clearly started before the runs below
        launcher = LocalRunLauncher()
        with instance_for_test() as instance:
            launcher.register_instance(instance)
            tagged = create_run_for_test(
                instance,
                job_name="tiny_job",
                status=DagsterRunStatus.STARTED,
                tags={RunTag.WORKER_PID: str(bystander.pid)},
            )
            # No worker recorded it: the tag is not taken for one (the code-server path runs).
            assert launcher._worker_pid(tagged) is None
            reused = create_run_for_test(
                instance, job_name="tiny_job", status=DagsterRunStatus.STARTED
            )
            _record_worker(instance, reused, bystander.pid)
            assert launcher.terminate(reused.run_id) is False
            assert launcher.check_run_worker_health(reused).status == WorkerStatus.FAILED
        assert bystander.poll() is None  # never signalled
    finally:
        bystander.kill()
        bystander.wait()


def _a_finished_pid() -> int:
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid
