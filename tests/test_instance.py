"""One source of Dagster instance settings: the repository's ``dagster.yaml``.

Proves that the shipped file holds every setting but storage (the threads production's sensors
need included), that production's instance takes its storage only from ``DAGSTER_PG_URL``, that
the daemon refuses a production instance on SQLite, and that the embedded stack, the bench, the
chaos soak and the end-to-end tests run exactly the shipped settings except the overrides they
name. Regression: the embedded instance was a second copy of the settings that had drifted
(monitoring, pool limit, sensor threads), so every figure measured a configuration production
did not run.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from dagster import DagsterInstance
from dagster._core.instance.config import dagster_instance_config

from ai_handler_dagster import cli, instance
from ai_handler_dagster.devstack.stack import Stack, StackConfig
from ai_handler_dagster.proving import bench, chaos
from ai_handler_dagster.settings import ConfigError
from tests.support.stack import stack_config

ROOT = Path(__file__).resolve().parents[1]


def test_the_shipped_file_is_every_setting_but_storage(tmp_path: Path) -> None:
    settings = instance.shipped_settings()
    assert "storage" not in settings
    # Production evaluates its three sensors and the schedule on threads.
    assert settings["sensors"] == {"use_threads": True, "num_workers": 4}
    assert settings["schedules"] == {"use_threads": True, "num_workers": 2}
    assert settings["run_launcher"]["class"] == "LocalRunLauncher"
    assert settings["run_retries"] == {
        "enabled": True,
        "max_retries": 3,
        "retry_on_asset_or_op_failure": False,
    }
    assert settings["run_monitoring"]["enabled"] is True
    # It is a valid instance on its own (Dagster's default storage in the folder).
    instance.write(tmp_path, settings)
    config, _ = dagster_instance_config(str(tmp_path))
    assert config["concurrency"]["pools"]["default_limit"] == 4
    with DagsterInstance.from_config(str(tmp_path)) as dagster:
        assert type(dagster.run_storage).__name__ == "SqliteRunStorage"


def test_production_takes_its_storage_only_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pg_url: str
) -> None:
    home = tmp_path / "prod"
    assert cli.main(["instance", "write", str(home)]) == 0
    written = yaml.safe_load((home / "dagster.yaml").read_text())
    assert written["storage"] == {"postgres": {"postgres_url": {"env": "DAGSTER_PG_URL"}}}
    assert instance.differences(written) == {}
    # A second write does not replace an operator's file by accident.
    assert cli.main(["instance", "write", str(home)]) == 2

    monkeypatch.delenv("DAGSTER_PG_URL", raising=False)
    with pytest.raises(Exception, match="DAGSTER_PG_URL"):
        DagsterInstance.from_config(str(home))
    monkeypatch.setenv("DAGSTER_PG_URL", instance.dagster_postgres_url(pg_url))
    with DagsterInstance.from_config(str(home)) as dagster:
        assert type(dagster.run_storage).__name__ == "PostgresRunStorage"
    instance.check_production_storage(home)  # accepted


def _daemon(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ai_handler_dagster.runtime.daemon", "run", "-w", "workspace.yaml"],
        cwd=ROOT,
        env={**os.environ, "AI_HANDLER_ENV": "production", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_daemon_refuses_production_on_sqlite(tmp_path: Path) -> None:
    """Regression guard: with DAGSTER_HOME at the repository root, Dagster would quietly keep
    production's runs in SQLite files on one host's disk."""
    done = _daemon({"DAGSTER_HOME": str(ROOT)})
    assert done.returncode == 2
    assert "has no PostgreSQL storage" in done.stderr
    assert "ai-handler instance write" in done.stderr
    missing = _daemon({"DAGSTER_HOME": str(tmp_path)})
    assert missing.returncode == 2 and "is missing" in missing.stderr


def test_the_daemon_refuses_runs_shorter_than_a_deadline(tmp_path: Path) -> None:
    """A run must outlive its prediction's deadline, or run monitoring kills it mid-wait."""
    short = instance.local_config(overrides={"run_monitoring.max_runtime_seconds": 900})
    instance.write(tmp_path, short)
    done = _daemon({"DAGSTER_HOME": str(tmp_path), "AI_HANDLER_ENV": "embedded"})
    assert done.returncode == 2
    assert "max_runtime_seconds is 900" in done.stderr and "2400 s at least" in done.stderr


def test_an_override_must_name_a_shipped_setting() -> None:
    with pytest.raises(ConfigError, match=r"run_monitoring\.poll_interval'"):
        instance.local_config(overrides={"run_monitoring.poll_interval": 3})
    with pytest.raises(ConfigError, match=r"storage\.postgres"):
        instance.local_config(overrides={"storage.postgres": {}})


def _stack_differences(config: StackConfig) -> dict[str, object]:
    return Stack(config).overrides()["instance"]


def test_local_runs_differ_from_production_only_where_they_say(tmp_path: Path) -> None:
    # The dev stack and the demo: production's settings, on local storage.
    assert _stack_differences(StackConfig(state_dir=tmp_path)) == {}
    # The end-to-end tests: exactly the named test overrides.
    assert instance.TEST_OVERRIDES.keys() == {"run_monitoring.poll_interval_seconds"}
    assert _stack_differences(stack_config(tmp_path)) == {
        key: o.value for key, o in instance.TEST_OVERRIDES.items()
    }
    # The bench: none by default; its instance options change only their own setting.
    app, pg = f"sqlite:///{tmp_path / 'app.db'}", "postgresql+psycopg2://u@h/db"
    default = bench.BenchConfig()
    assert _stack_differences(bench._stack_config(default, tmp_path, app, pg)) == {}
    runs = bench.BenchConfig(max_concurrent_runs=8)
    assert _stack_differences(bench._stack_config(runs, tmp_path, app, pg)) == {
        "concurrency.runs.max_concurrent_runs": 8
    }
    naive = bench.BenchConfig(naive=True)
    assert _stack_differences(bench._stack_config(naive, tmp_path, app, pg)) == {
        "run_launcher.config.warm_start": False
    }
    # The chaos soak: production's settings.
    soak = chaos._stack_config(chaos.ChaosConfig(), tmp_path, app, pg)
    assert _stack_differences(soak) == {}


def test_a_postgres_stack_names_its_driver(tmp_path: Path) -> None:
    config = StackConfig(
        state_dir=tmp_path,
        storage="postgres",
        dagster_pg_url="postgresql://postgres@127.0.0.1:5432/dagster",
    )
    written = Stack(config).instance_config()
    assert written["storage"] == {
        "postgres": {"postgres_url": "postgresql+psycopg2://postgres@127.0.0.1:5432/dagster"}
    }
    assert instance.differences(written) == {}


def test_bench_lists_its_instance_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "--help"]) == 0
    text = capsys.readouterr().out
    assert "override a setting of the shipped dagster.yaml" in text
    assert "concurrency.runs.max_concurrent_runs" in text
    assert "run_launcher.config.warm_start" in text


def test_the_naive_bench_loads_its_own_code_location(tmp_path: Path) -> None:
    # The naive design used to be chosen by AI_HANDLER_EXECUTOR, read when the job module was
    # imported: the bench changed the project's job through the environment.
    app, pg = f"sqlite:///{tmp_path / 'app.db'}", "postgresql+psycopg2://u@h/db"
    naive = bench._stack_config(bench.BenchConfig(naive=True), tmp_path, app, pg)
    batched = bench._stack_config(bench.BenchConfig(), tmp_path, app, pg)
    assert batched.workspace == instance.WORKSPACE_FILE
    assert "AI_HANDLER_EXECUTOR" not in naive.extra_env
    loaded = yaml.safe_load(naive.workspace.read_text())["load_from"][0]["python_module"]
    assert loaded == {
        "module_name": "ai_handler_dagster.proving.naive",
        "attribute": "defs",
        "location_name": "ai_handler",
    }
    from ai_handler_dagster.definitions import defs
    from ai_handler_dagster.proving.naive import defs as naive_defs

    def shape(d: Any) -> tuple[set[str], set[str]]:
        return {j.name for j in d.resolve_all_job_defs()}, {s.name for s in d.sensors or []}

    assert shape(naive_defs) == shape(defs)
    assert naive_defs.get_job_def("generation_job").executor_def.name == "multiprocess"
    assert defs.get_job_def("generation_job").executor_def.name == "in_process"


def test_the_executor_setting_still_works_and_says_it_is_deprecated(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from ai_handler_dagster import definitions

    monkeypatch.setenv("AI_HANDLER_EXECUTOR", "multiprocess")
    with caplog.at_level(logging.WARNING):
        assert definitions._executor_from_settings().name == "multiprocess"
    assert "deprecated" in caplog.text and "proving.naive" in caplog.text
    monkeypatch.delenv("AI_HANDLER_EXECUTOR")
    caplog.clear()
    assert definitions._executor_from_settings().name == "in_process"
    assert caplog.text == ""
