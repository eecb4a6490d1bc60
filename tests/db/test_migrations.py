"""The hand-written migrations build exactly the schema the models describe, on both databases.

Proves: ``upgrade`` reaches head and is repeatable; Alembic's compare_metadata finds no
difference between the migrated database and ``db/models.py`` (types, columns, indexes, unique
constraints, foreign keys); the named CHECK constraints and the partial unique indexes that
compare_metadata does not look at exist too; concurrent upgrades from several processes or
threads migrate once and all succeed; upgrade works from any working directory; the
server-side defaults let another application insert a generation with only the essential columns.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from ai_handler_dagster import db
from ai_handler_dagster.db.engine import dispose_engines, make_engine
from ai_handler_dagster.db.models import Base


@pytest.fixture(autouse=True)
def _close_engines():
    yield
    dispose_engines()


def test_upgrade_reaches_head_and_is_repeatable(any_db_url: str) -> None:
    assert db.current_revision(any_db_url) is None
    assert db.upgrade(any_db_url) == db.head_revision()
    # A second upgrade (another process starting, a re-run of the CLI) changes nothing.
    assert db.upgrade(any_db_url) == db.head_revision()


def test_migrated_schema_matches_models(any_db_url: str) -> None:
    db.upgrade(any_db_url)
    with make_engine(any_db_url).connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        diff = compare_metadata(context, Base.metadata)
    assert diff == []


def test_check_constraints_and_partial_indexes_exist(any_db_url: str) -> None:
    db.upgrade(any_db_url)
    inspector = sa.inspect(make_engine(any_db_url))
    for table in Base.metadata.sorted_tables:
        # Models name checks briefly; the naming convention prefixes them in the database.
        expected = {
            f"ck_{table.name}_{c.name}"
            for c in table.constraints
            if isinstance(c, sa.CheckConstraint) and isinstance(c.name, str)
        }
        found = {c["name"] for c in inspector.get_check_constraints(table.name)}
        assert expected <= found, f"{table.name}: missing {expected - found}"
    indexes = {i["name"]: i for i in inspector.get_indexes("ledger_entries")}
    for name in ("uq_ledger_entries_hold_ending", "uq_ledger_entries_hold_opening"):
        assert indexes[name]["unique"]


def test_upgrade_from_another_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The migrations folder is found relative to the package, not the current directory.
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'nested' / 'deeper' / 'app.db'}"
    assert db.upgrade(url) == db.head_revision()
    assert (tmp_path / "nested" / "deeper" / "app.db").exists()


def test_default_url_comes_from_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AI_HANDLER_DATABASE_URL", f"sqlite:///{tmp_path / 'env.db'}")
    assert db.upgrade() == db.head_revision()
    assert (tmp_path / "env.db").exists()


def test_minimal_insert_by_another_application(any_db_url: str) -> None:
    # An app that knows only user, model and input can insert a request with plain SQL.
    db.upgrade(any_db_url)
    with make_engine(any_db_url).begin() as conn:
        conn.execute(
            sa.text("INSERT INTO generations (user_id, model, input) VALUES (:u, :m, :i)"),
            {"u": "alice", "m": "demo/pixel-sketch", "i": json.dumps({"prompt": "a cat"})},
        )
        row = conn.execute(
            sa.text(
                "SELECT status, attempt, amount_held, amount_charged, created_at, updated_at"
                " FROM generations"
            )
        ).one()
    assert row.status == "pending"
    assert row.attempt == 1
    assert (row.amount_held, row.amount_charged) == (0, 0)
    assert row.created_at is not None and row.updated_at is not None


@pytest.mark.slow
def test_concurrent_upgrades_run_the_migrations_once(any_db_url: str) -> None:
    # Several processes (code server, daemon, CLI) may start at once on a fresh database; the
    # database serializes them (advisory lock / BEGIN IMMEDIATE) and only the first migrates.
    script = "import sys; from ai_handler_dagster import db; print(db.upgrade(sys.argv[1]))"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, any_db_url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    results = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0] * 3, [err for _, err in results]
    assert [out.strip() for out, _ in results] == [db.head_revision()] * 3
    assert db.current_revision(any_db_url) == db.head_revision()


def test_upgrades_from_threads_of_one_process_are_serialized(any_db_url: str) -> None:
    # Alembic's context is process-global; two threads must not run it at the same time.
    barrier = threading.Barrier(4, timeout=30)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            barrier.wait()
            db.upgrade(any_db_url)
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert db.current_revision(any_db_url) == db.head_revision()
