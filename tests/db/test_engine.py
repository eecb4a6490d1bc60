"""Engines and transactions behave the way the ledger's correctness depends on.

Proves: engines are cached per URL; a SQLite file's parent folder is created; SQLite runs in WAL
mode with foreign keys enforced; every SQLite transaction takes the write lock at BEGIN, so
concurrent read-modify-write transactions from many threads neither lose updates nor fail with
"database is locked"; ``session_scope`` commits on success and rolls back on error; PostgreSQL
engines have a pool that serves 32 threads at once.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from ai_handler_dagster.db.engine import dispose_engines, make_engine, session_scope


@pytest.fixture(autouse=True)
def _close_engines() -> Iterator[None]:
    yield
    dispose_engines()


def test_engine_is_cached_per_url(tmp_path: Path) -> None:
    a = f"sqlite:///{tmp_path / 'a.db'}"
    b = f"sqlite:///{tmp_path / 'b.db'}"
    assert make_engine(a) is make_engine(a)
    assert make_engine(a) is not make_engine(b)


def test_sqlite_file_folder_is_created_and_pragmas_apply(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "folder" / "app.db"
    engine = make_engine(f"sqlite:///{path}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 10_000
    assert path.exists()


def test_sqlite_enforces_foreign_keys(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
        conn.exec_driver_sql(
            "CREATE TABLE child (id INTEGER PRIMARY KEY, p INTEGER REFERENCES parent)"
        )
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO child (p) VALUES (42)")


def test_session_scope_commits_or_rolls_back(any_db_url: str) -> None:
    engine = make_engine(any_db_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (v INTEGER)")
    with session_scope(engine) as session:
        session.execute(sa.text("INSERT INTO t VALUES (1)"))
    with pytest.raises(RuntimeError), session_scope(engine) as session:
        session.execute(sa.text("INSERT INTO t VALUES (2)"))
        raise RuntimeError("boom")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT v FROM t").scalars().all() == [1]


def test_sqlite_concurrent_read_modify_write_loses_nothing(sqlite_url: str) -> None:
    # Regression guard: with pysqlite's default deferred BEGIN, two threads read the same value
    # and one increment is lost, or both try to upgrade their read lock and one fails at once
    # with "database is locked". BEGIN IMMEDIATE serializes them.
    engine = make_engine(sqlite_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE counter (v INTEGER NOT NULL)")
        conn.exec_driver_sql("INSERT INTO counter VALUES (0)")
    threads, rounds = 16, 15
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads)

    def work() -> None:
        try:
            barrier.wait()
            for _ in range(rounds):
                with session_scope(engine) as session:
                    value = session.execute(sa.text("SELECT v FROM counter")).scalar_one()
                    session.execute(sa.text("UPDATE counter SET v = :v"), {"v": value + 1})
        except BaseException as exc:  # reported below; a thread's exception is otherwise lost
            errors.append(exc)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert errors == []
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT v FROM counter").scalar() == threads * rounds


def test_postgres_pool_serves_32_threads_at_once(pg_url: str) -> None:
    engine = make_engine(pg_url)
    barrier = threading.Barrier(32, timeout=30)
    errors: list[BaseException] = []

    def hold_connection() -> None:
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
                # All 32 connections are checked out at the same moment.
                barrier.wait()
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=hold_connection) for _ in range(32)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert errors == []
    assert engine.dialect.name == "postgresql"
