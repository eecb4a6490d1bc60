"""Dagster resources for the app database and the price book.

Both are thin: the database resource hands out the process-wide SQLAlchemy engine for its URL
(engines are cached per URL, so every op and sensor in a process shares one pool), and the pricing
resource loads the price table once per process.

In the embedded setup the SQLite app database is created (or brought to the newest schema) the
first time a process opens it, so plain ``dagster dev`` in a fresh clone ticks its sensors
without an ``ai-handler db upgrade`` first. Production databases are only ever migrated by
``ai-handler db upgrade``.
"""

from __future__ import annotations

import os
import threading
from functools import lru_cache

import sqlalchemy as sa
from dagster import ConfigurableResource
from pydantic import Field

from ai_handler_dagster import settings
from ai_handler_dagster.db.engine import is_sqlite, make_engine
from ai_handler_dagster.pricing import PriceBook, load_pricing


class DatabaseResource(ConfigurableResource):
    """The app database (accounts, ledger, generations)."""

    url: str | None = Field(
        default=None,
        description=(
            "SQLAlchemy URL of the app database. Unset: AI_HANDLER_DATABASE_URL, else a SQLite "
            "file in the state folder."
        ),
    )

    def engine(self) -> sa.Engine:
        engine = make_engine(self.url)
        if is_sqlite(engine) and settings.environment() is settings.Environment.EMBEDDED:
            _ensure_schema(engine)
        return engine


_schema_ready: set[tuple[int, str]] = set()
_schema_lock = threading.Lock()


def _ensure_schema(engine: sa.Engine) -> None:
    """Migrate an embedded SQLite database once per process if it is behind (or empty)."""
    url = engine.url.render_as_string(hide_password=False)
    key = (os.getpid(), url)
    if key in _schema_ready:
        return
    from ai_handler_dagster import db

    with _schema_lock:
        if key not in _schema_ready:
            if db.current_revision(url) != db.head_revision():
                db.upgrade(url)
            _schema_ready.add(key)


@lru_cache(maxsize=8)
def _price_book(path: str | None) -> PriceBook:
    return load_pricing(path)


class PricingResource(ConfigurableResource):
    """Credits charged per model: fixed, per second, per output or per token (``pricing``)."""

    pricing_file: str | None = Field(
        default=None,
        description=(
            "TOML price table. Unset: AI_HANDLER_PRICING_FILE, else the table shipped with the "
            "package."
        ),
    )

    def book(self) -> PriceBook:
        return _price_book(self.pricing_file)
