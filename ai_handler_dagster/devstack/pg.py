"""Throwaway PostgreSQL databases on a local server, for the benchmark, the soak and the tests."""

from __future__ import annotations

import uuid

import sqlalchemy as sa


def _admin(admin_url: str) -> sa.Engine:
    return sa.create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)


def new_database(admin_url: str, prefix: str = "aih") -> str:
    """Create an empty database on the server of ``admin_url``; return its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    engine = _admin(admin_url)
    with engine.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return sa.make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def drop_database(admin_url: str, url: str) -> None:
    """Drop a database made by ``new_database``, closing its remaining connections first."""
    name = sa.make_url(url).database
    engine = _admin(admin_url)
    with engine.connect() as conn:
        conn.execute(
            sa.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = :name AND pid <> pg_backend_pid()"
            ),
            {"name": name},
        )
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
    engine.dispose()
