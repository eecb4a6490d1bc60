"""The app database: typed models, engines and hand-written Alembic migrations.

``upgrade(url)`` brings a database to the newest schema; ``ai-handler db upgrade`` calls it.
"""

from __future__ import annotations

import threading
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from ai_handler_dagster.db.engine import make_engine, session_scope
from ai_handler_dagster.db.models import Account, Base, Generation, Hold, LedgerEntry

__all__ = [
    "Account",
    "Base",
    "Generation",
    "Hold",
    "LedgerEntry",
    "alembic_config",
    "current_revision",
    "head_revision",
    "make_engine",
    "session_scope",
    "upgrade",
]

# Found next to this file, so migrations run from any working directory and from an install.
_HERE = Path(__file__).resolve().parent
# Alembic keeps its running migration context in module globals: one upgrade per process at a time.
# (Upgrades from different processes are serialized by the database, see migrations/env.py.)
_upgrade_lock = threading.Lock()


def alembic_config() -> Config:
    """Alembic configuration pointing at this package's migrations."""
    config = Config(str(_HERE / "alembic.ini"))
    config.set_main_option("script_location", str(_HERE / "migrations"))
    return config


def head_revision() -> str:
    """The newest migration revision shipped with the package."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(url: str | None = None) -> str | None:
    """The revision the database at ``url`` is at (None if it was never migrated)."""
    with make_engine(url).connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(url: str | None = None, revision: str = "head") -> str | None:
    """Run the migrations on ``url`` (default: ``settings.database_url()``) up to ``revision``.

    Safe to call from several processes at once (see ``migrations/env.py``). Returns the revision
    the database is at afterwards.
    """
    engine = make_engine(url)
    config = alembic_config()
    with _upgrade_lock, engine.connect() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
    return current_revision(engine.url.render_as_string(hide_password=False))
