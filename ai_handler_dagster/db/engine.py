"""Engines and transactions for the app database (SQLite embedded, PostgreSQL in production).

Every write path of the project follows the same rule: one ``session_scope`` is one transaction,
and the rows it changes are locked. The engines here make that rule hold on both databases:

- PostgreSQL: ``SELECT ... FOR UPDATE`` does the locking; the pool is large enough for 32 threads
  and pre-pings connections so a restarted server does not surface as a failed run.
- SQLite: there are no row locks, so every transaction starts with ``BEGIN IMMEDIATE`` and takes
  the database's single write lock up front. Concurrent writers then queue on ``busy_timeout``
  instead of deadlocking (two deferred readers that both try to upgrade to writers) or losing an
  update (read, compute, write on a stale value). pysqlite's own transaction handling has to be
  switched off for this, otherwise it would emit a plain ``BEGIN`` of its own.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from ai_handler_dagster import settings

#: How long a SQLite writer waits for the write lock before giving up.
SQLITE_BUSY_TIMEOUT_S = 60.0
#: Connections kept open per engine; bursts may open more, up to settings.db_pool_max() in all.
POOL_SIZE = 8

_engines: dict[tuple[int, str], Engine] = {}
_engines_lock = threading.Lock()


def is_sqlite(bind: Engine | sa.Connection | Session) -> bool:
    """True when ``bind`` talks to SQLite (which has no row locks and no SKIP LOCKED)."""
    if isinstance(bind, Session):
        return bind.get_bind().dialect.name == "sqlite"
    return bind.dialect.name == "sqlite"


def make_engine(url: str | URL | None = None) -> Engine:
    """The engine for ``url`` (default: ``settings.database_url()``), cached per URL and process.

    Engines are cached because each one owns a connection pool; creating one per call would open
    a new pool (and new connections) for every transaction. The cache is keyed by process id too:
    a forked child must not reuse the parent's pooled sockets.
    """
    if url is None:
        url = settings.database_url()
    sa_url = sa.make_url(url)
    key = (os.getpid(), sa_url.render_as_string(hide_password=False))
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None:
            engine = _create_engine(sa_url)
            _engines[key] = engine
        return engine


def dispose_engines() -> None:
    """Close every cached engine of this process (tests and shutdown use it)."""
    with _engines_lock:
        for (pid, _), engine in list(_engines.items()):
            if pid == os.getpid():
                engine.dispose()
        _engines.clear()


def _create_engine(url: URL) -> Engine:
    if url.get_backend_name() == "sqlite":
        return _create_sqlite_engine(url)
    return sa.create_engine(url, **_pool_options())


def _pool_options() -> dict[str, Any]:
    """The pool of every PostgreSQL engine."""
    return {
        "pool_pre_ping": True,
        "pool_size": min(POOL_SIZE, settings.db_pool_max()),
        "max_overflow": max(0, settings.db_pool_max() - POOL_SIZE),
        # Pool waits longer than the default 30 s: 32 busy threads must queue, not fail.
        "pool_timeout": 120,
    }


def make_counter_engine(engine: Engine) -> Engine:
    """A second engine on ``engine``'s PostgreSQL database for bookkeeping that may lag: each
    statement its own transaction (autocommit), and commits that do not wait for the disk
    (``synchronous_commit=off``), so a crash can forget the last fraction of a second of what it
    wrote. The HTTP API counts requests on it; nothing that moves credits or a generation may
    use it. On SQLite it is ``engine`` itself (its writes need their transaction)."""
    if engine.dialect.name == "sqlite":
        return engine
    counter = sa.create_engine(engine.url, isolation_level="AUTOCOMMIT", **_pool_options())

    @event.listens_for(counter, "connect")
    def _lagging_commits(dbapi_connection: Any, _record: Any) -> None:
        # A statement, not connect_args' "options": those would replace the options the
        # database URL may carry (a search_path, a statement_timeout).
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("SET synchronous_commit TO off")
        finally:
            cursor.close()
        dbapi_connection.commit()  # the setting outlives this transaction (if one began)

    return counter


def _create_sqlite_engine(url: URL) -> Engine:
    database = url.database or ""
    in_memory = database in ("", ":memory:") or database.startswith("file::memory:")
    connect_args: dict[str, Any] = {
        "timeout": SQLITE_BUSY_TIMEOUT_S,
        # Connections move between threads through the pool; each is used by one thread at a time.
        "check_same_thread": False,
    }
    if in_memory:
        # One shared connection, or every checkout would see a different empty database.
        engine = sa.create_engine(url, connect_args=connect_args, poolclass=StaticPool)
    else:
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(
            url,
            connect_args=connect_args,
            pool_size=min(POOL_SIZE, settings.db_pool_max()),
            max_overflow=max(0, settings.db_pool_max() - POOL_SIZE),
            pool_timeout=120,
        )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Hand transaction control to SQLAlchemy (see the "begin" hook below).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            if not in_memory:
                # WAL lets readers of other processes (the Dagster UI, sensors) proceed while a
                # writer holds the lock.
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        # Take the write lock now rather than at the first write: see the module docstring.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


@contextmanager
def session_scope(engine: Engine | None = None) -> Iterator[Session]:
    """One transaction: commit when the block ends, roll back if it raises.

    Objects stay usable after the commit (``expire_on_commit=False``) so callers can return them.
    """
    session = Session(engine if engine is not None else make_engine(), expire_on_commit=False)
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
