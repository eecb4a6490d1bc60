"""Concurrency pools are prepared by the launching process, so run workers never create them.

Dagster creates a pool's limit row in the first run worker that claims a slot. On PostgreSQL that
creation fails whenever the row already exists: the insert's IntegrityError aborts the transaction
and the update that should follow fails with it. Two runs reaching the pool together on a fresh
database then race (one fails with "duplicate key ... concurrency_limits_concurrency_key_key"; it
was seen in the end-to-end suite), and after ``default_limit`` changes every claim fails.
``launcher.prepare_pools`` creates or resets the rows from the one launching process.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from dagster import DagsterInstance
from dagster._core.execution.plan.instance_concurrency_context import InstanceConcurrencyContext
from dagster._core.test_utils import create_run_for_test

from ai_handler_dagster import instance
from ai_handler_dagster.definitions import defs
from ai_handler_dagster.orchestration.generation import batch_run_config
from ai_handler_dagster.runtime.launcher import LocalRunLauncher, prepare_pools
from tests.support.db import race

POOL = "replicate"


def _write(home: Path, url: str | None, limit: int) -> None:
    """The shipped instance settings with the pool's ``default_limit`` at ``limit``."""
    config = instance.local_config(
        postgres_url=url, overrides={"concurrency.pools.default_limit": limit}
    )
    instance.write(home, config)


def _instance(
    tmp_path: Path, name: str, storage: str, url: str | None, limit: int
) -> DagsterInstance:
    home = tmp_path / name
    _write(home, url if storage == "postgres" else None, limit)
    return DagsterInstance.from_config(str(home))


@pytest.fixture(params=["sqlite", "postgres"])
def storage(request: pytest.FixtureRequest) -> tuple[str, str | None]:
    """(kind, Dagster storage URL): SQLite in the instance folder, or a new PostgreSQL database."""
    if request.param == "sqlite":
        return "sqlite", None
    return "postgres", request.getfixturevalue("pg_url")


def _pair(
    tmp_path: Path, storage: tuple[str, str | None], first: int, second: int
) -> tuple[DagsterInstance, DagsterInstance]:
    """Two instances on one storage whose ``default_limit`` differs (before and after an edit)."""
    kind, url = storage
    before = _instance(tmp_path, "a", kind, url, first)
    if kind == "postgres":
        return before, _instance(tmp_path, "b", kind, url, second)
    # SQLite keeps its storage in the instance folder: edit that folder's file and load it again.
    _write(tmp_path / "a", None, second)
    return before, DagsterInstance.from_config(str(tmp_path / "a"))


def _limits(instance: DagsterInstance) -> dict[str, tuple[int, bool]]:
    return {p.name: (p.limit, p.from_default) for p in instance.event_log_storage.get_pool_limits()}


def _claim(instance: DagsterInstance, step_key: str, hold: threading.Barrier | None = None) -> bool:
    """What a run worker does before a pooled step: claim a slot (True if it got one). A slot is
    held until the step ends; with ``hold``, the claim is kept until every party has claimed."""
    run = create_run_for_test(instance, job_name="generation_job")
    with InstanceConcurrencyContext(instance, run) as context:
        claimed = context.claim(POOL, step_key)
        if hold is not None:
            hold.wait()
        return claimed


def test_a_fresh_pool_is_created_at_the_default_limit(
    tmp_path: Path, storage: tuple[str, str | None]
) -> None:
    kind, url = storage
    with _instance(tmp_path, "a", kind, url, 5) as instance:
        assert _limits(instance) == {}
        assert prepare_pools(instance, [POOL, POOL]) == [POOL]
        assert _limits(instance) == {POOL: (5, True)}
        assert instance.event_log_storage.get_concurrency_info(POOL).slot_count == 5
        # Again: nothing to do, and nothing fails (Dagster's own initialisation would, on
        # PostgreSQL, now that the row exists).
        assert prepare_pools(instance, [POOL]) == []
        assert _limits(instance) == {POOL: (5, True)}


def test_a_changed_default_limit_is_applied_before_workers_claim(
    tmp_path: Path, storage: tuple[str, str | None]
) -> None:
    before, after = _pair(tmp_path, storage, 4, 6)
    with before, after:
        assert _claim(before, "create_predictions")  # the worker creates the row (limit 4)
        assert _limits(after) == {POOL: (4, True)}
        if storage[0] == "postgres":
            # The trap this guards against: with the default edited to 6, Dagster's worker-side
            # update of the row fails on PostgreSQL, so every run claiming the pool would fail.
            with pytest.raises(Exception, match=r"InFailedSqlTransaction|current transaction"):
                _claim(after, "create_predictions")
        assert prepare_pools(after, [POOL]) == [POOL]
        assert _limits(after) == {POOL: (6, True)}
        assert after.event_log_storage.get_concurrency_info(POOL).slot_count == 6
        assert _claim(after, "create_predictions")


def test_a_limit_an_operator_set_is_left_alone(
    tmp_path: Path, storage: tuple[str, str | None]
) -> None:
    kind, url = storage
    with _instance(tmp_path, "a", kind, url, 5) as instance:
        instance.event_log_storage.set_concurrency_slots(POOL, 2)
        assert prepare_pools(instance, [POOL]) == []
        assert _limits(instance) == {POOL: (2, False)}


def test_workers_claiming_a_prepared_pool_at_once_all_get_an_answer(
    tmp_path: Path, pg_url: str
) -> None:
    """Eight run workers claim the prepared pool at the same moment, and none of them fails."""
    with _instance(tmp_path, "a", "postgres", pg_url, 3) as instance:
        assert prepare_pools(instance, [POOL]) == [POOL]  # created here, not by a worker
        claimed = threading.Barrier(8, timeout=60)
        outcomes = race(8, lambda i: _claim(instance, f"step_{i}", hold=claimed))
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        results = [o for o in outcomes if not isinstance(o, BaseException)]
        assert errors == []
        # Some got a slot and the rest wait. How many got one is Dagster's claim to keep: on
        # PostgreSQL its slot update is not conditional, so concurrent claims can exceed the limit.
        assert len(results) == 8 and True in results
        assert instance.event_log_storage.get_concurrency_info(POOL).slot_count == 3


def test_the_launcher_prepares_the_pools_of_a_runs_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REPLICATE_API_TOKEN", "r8_for_the_run_config_only")
    with _instance(tmp_path, "a", "sqlite", None, 4) as instance:
        launcher = instance.run_launcher
        assert isinstance(launcher, LocalRunLauncher)
        run = instance.create_run_for_job(
            defs.get_job_def("generation_job"),
            run_config=batch_run_config([1]).to_config_dict(),
        )
        assert _limits(instance) == {}
        launcher._prepare_pools(run)
        # create_predictions is the job's pooled step.
        assert _limits(instance) == {POOL: (4, True)}
