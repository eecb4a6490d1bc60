"""The HTTP API in tests: a real uvicorn server on a free port, and keys to call it with."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import sqlalchemy as sa

from ai_handler_dagster.api import keys
from ai_handler_dagster.api.app import create_app
from ai_handler_dagster.api.server import start_server
from ai_handler_dagster.db.engine import session_scope
from ai_handler_dagster.pricing import PriceBook, load_pricing


@dataclass
class Api:
    """A running API: its base ``url``, its database ``engine`` and a way to make keys."""

    url: str
    engine: sa.Engine

    def key(self, *scopes: str, **options: Any) -> str:
        """A new key with ``scopes`` (default every scope through ``admin``)."""
        with session_scope(self.engine) as session:
            full, _ = keys.create(
                session, name="test", scopes=list(scopes or (keys.ADMIN,)), **options
            )
        return full

    def client(self, key: str | None = None, **options: Any) -> httpx.Client:
        """An HTTP client on the API, sending ``key`` as its bearer token."""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, **options)


@contextmanager
def running_api(engine: sa.Engine, prices: PriceBook | None = None) -> Iterator[Api]:
    """Serve the API on ``engine`` (migrated) over real HTTP until the block ends."""
    app = create_app(engine, prices=prices if prices is not None else load_pricing())
    with start_server(app) as handle:
        yield Api(handle.url, engine)
