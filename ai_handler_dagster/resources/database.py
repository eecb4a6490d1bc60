"""Dagster resources for the app database and the price book.

Both are thin: the database resource hands out the process-wide SQLAlchemy engine for its URL
(engines are cached per URL, so every op and sensor in a process shares one pool), and the pricing
resource loads the price table once per process.
"""

from __future__ import annotations

from functools import lru_cache

import sqlalchemy as sa
from dagster import ConfigurableResource
from pydantic import Field

from ai_handler_dagster.db.engine import make_engine
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
        return make_engine(self.url)


@lru_cache(maxsize=8)
def _price_book(path: str | None) -> PriceBook:
    return load_pricing(path)


class PricingResource(ConfigurableResource):
    """Credits charged per model (fixed per generation or metered per second)."""

    pricing_file: str | None = Field(
        default=None,
        description=(
            "TOML price table. Unset: AI_HANDLER_PRICING_FILE, else the table shipped with the "
            "package."
        ),
    )

    def book(self) -> PriceBook:
        return _price_book(self.pricing_file)
