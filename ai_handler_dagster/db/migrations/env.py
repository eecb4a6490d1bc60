"""Alembic environment of the app database (SQLite and PostgreSQL).

Migrations are written by hand; ``target_metadata`` is only here so tests can compare the migrated
schema with the models. Each upgrade runs in one transaction:

- PostgreSQL: a transaction-level advisory lock first, so two processes upgrading at the same time
  (a code location and the CLI, say) run the migrations once, one after the other.
- SQLite: ``BEGIN IMMEDIATE`` (see ``db/engine.py``) serializes upgrades. Foreign keys are switched
  off for the duration, because batch mode rebuilds a table by copy-drop-rename, which a referenced
  table would not survive; ``PRAGMA foreign_key_check`` then proves nothing was left dangling.
"""

from __future__ import annotations

import logging.config

import sqlalchemy as sa
from alembic import context

from ai_handler_dagster import settings
from ai_handler_dagster.db.engine import make_engine
from ai_handler_dagster.db.models import Base

#: Arbitrary constant naming this project's migration lock (``pg_advisory_xact_lock``).
MIGRATION_LOCK_ID = 0x41494844  # "AIHD"

config = context.config
target_metadata = Base.metadata


def _run_in_transaction(connection: sa.Connection) -> None:
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_ID})")
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()
    if connection.dialect.name == "sqlite":
        dangling = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
        if dangling:
            raise RuntimeError(f"migration left rows with dangling foreign keys: {dangling[:5]}")


def _set_sqlite_foreign_keys(connection: sa.Connection, enabled: bool) -> None:
    # PRAGMA foreign_keys is a no-op inside a transaction, so it goes straight to the driver
    # connection (which runs in autocommit mode, see engine.py) before BEGIN.
    dbapi = connection.connection.driver_connection
    assert dbapi is not None
    dbapi.execute(f"PRAGMA foreign_keys={'ON' if enabled else 'OFF'}")


def run_migrations_online() -> None:
    """Run the migrations on the connection given by the caller, or on a new one."""
    given: sa.Connection | None = config.attributes.get("connection")
    if given is not None and given.in_transaction():
        # The caller owns the transaction (Alembic's documented "shared connection" recipe).
        _run_in_transaction(given)
        return
    if given is None and config.config_file_name is not None:
        # Only the `alembic` command line configures logging; a programmatic upgrade must not
        # replace the host application's logging.
        logging.config.fileConfig(config.config_file_name, disable_existing_loggers=False)

    def run(connection: sa.Connection) -> None:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:
            _set_sqlite_foreign_keys(connection, False)
        try:
            with connection.begin():
                _run_in_transaction(connection)
        finally:
            if sqlite:
                _set_sqlite_foreign_keys(connection, True)

    if given is not None:
        run(given)
        return
    url = config.get_main_option("sqlalchemy.url") or settings.database_url()
    with make_engine(url).connect() as connection:
        run(connection)


def run_migrations_offline() -> None:
    """Print the SQL instead of running it (``alembic upgrade head --sql``)."""
    url = config.get_main_option("sqlalchemy.url") or settings.database_url()
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=sa.make_url(url).get_backend_name() == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
