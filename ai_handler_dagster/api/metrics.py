"""The service's Prometheus metrics: what the workers measure, and what the database tells.

Two sources, so every figure is right however many workers and hosts serve the API:

- Measured in the worker: ``ai_handler_api_request_seconds{method,route,status}``, the duration
  of every request by route template (``RequestMetrics``, an ASGI middleware). Submit latency is
  its ``POST /v1/generations`` series. Any other metric registered through prometheus-client
  (the webhook deliveries counter, for one) is exposed too. With several workers
  (``PROMETHEUS_MULTIPROC_DIR`` set, as ``ai-handler serve --workers N`` does) every worker
  writes its values to that directory and a scrape, whichever worker answers it, adds up all of
  them (prometheus-client's multiprocess mode). Only counters and histograms are measured here,
  so a worker that exits needs no clean-up: its counts stay part of the sums.
- Read from the database at scrape time (``DatabaseCollector``): generations by status and
  error code, the credits held and granted, and the settle latency (submit to terminal) of the
  generations that ended in the last ``SETTLE_WINDOW``. Generations end in Dagster runs and
  sensors, in other processes and hosts than this service, so an observation where they end
  would never reach this process; the database sees every ending. The settle histogram is
  therefore a *gauge histogram* over a sliding window (it goes down when old endings leave the
  window): read its quantiles directly, ``histogram_quantile(0.99,
  ai_handler_generation_settle_seconds_bucket)``, without ``rate()``. Each query is one
  group-by over an index (``(status, error_code)``, ``finished_at``) or one sum over accounts.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from datetime import timedelta

import sqlalchemy as sa
from prometheus_client import REGISTRY, CollectorRegistry, Histogram
from prometheus_client.core import GaugeHistogramMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from sqlalchemy.orm import Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ai_handler_dagster.db.engine import session_scope
from ai_handler_dagster.db.models import Account, Generation, utcnow
from ai_handler_dagster.domain import TERMINAL, GenerationStatus

log = logging.getLogger(__name__)

#: The environment variable of prometheus-client's multiprocess mode (``api/server.py`` sets it).
MULTIPROC_DIR_VAR = "PROMETHEUS_MULTIPROC_DIR"
#: The ``route`` label of requests that matched no route (a fixed value, so unknown URLs
#: cannot grow the number of series).
UNMATCHED = "unmatched"
#: Generations whose settle latency the histogram shows: those that ended this recently.
SETTLE_WINDOW = timedelta(minutes=15)
#: Upper bounds (seconds) of the settle histogram's buckets.
SETTLE_BUCKETS = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0)

REQUEST_SECONDS = Histogram(
    "ai_handler_api_request_seconds",
    "Time to answer a request of the HTTP API, by method, route template and status",
    ["method", "route", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)


class RequestMetrics:
    """ASGI middleware: observe each request's duration in ``REQUEST_SECONDS``.

    The route is the matched template (``/v1/users/{user}/credits``), which the router leaves in
    the scope; a request refused before routing (a body over the limit) or matching no route is
    ``unmatched``. An exception escaping the app is counted as a 500, which is what the server
    answers.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: int | None = None

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        start = time.perf_counter()
        try:
            await self.app(scope, receive, watch)
        except BaseException:
            status = 500
            raise
        finally:
            if status is not None:
                route = scope.get("route")
                template = getattr(route, "path", None) or UNMATCHED
                REQUEST_SECONDS.labels(scope["method"], template, str(status)).observe(
                    time.perf_counter() - start
                )


def _settle_seconds(dialect: str) -> sa.ColumnElement[float]:
    """A generation's ``finished_at - created_at`` in seconds, in SQL."""
    start, end = Generation.created_at, Generation.finished_at
    if dialect == "sqlite":
        # Stored as UTC text; julianday() reads it as days.
        return (sa.func.julianday(end) - sa.func.julianday(start)) * 86400.0
    return sa.cast(sa.func.extract("epoch", end - start), sa.Float)


class DatabaseCollector(Collector):
    """Metrics read from the app database at each scrape (see the module docstring)."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "ai_handler_metrics_database_up",
            "1 if the metrics read from the app database at this scrape could be read",
        )
        try:
            families = list(self._read())
        except sa.exc.SQLAlchemyError as exc:
            log.warning("metrics: the app database did not answer: %s", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _read(self) -> Iterator[Metric]:
        with session_scope(self.engine) as session:
            counts = session.execute(
                sa.select(Generation.status, Generation.error_code, sa.func.count()).group_by(
                    Generation.status, Generation.error_code
                )
            ).all()
            held, balance = session.execute(
                sa.select(
                    sa.func.coalesce(sa.func.sum(Account.held), 0),
                    sa.func.coalesce(sa.func.sum(Account.balance), 0),
                )
            ).one()
            settle = self._settle_rows(session)
        generations = GaugeMetricFamily(
            "ai_handler_generations",
            "Generations in each status, by error code ('' for none)",
            labels=["status", "error_code"],
        )
        seen = set()
        for status, code, n in counts:
            generations.add_metric([status, code or ""], n)
            seen.add(status)
        for status in GenerationStatus:
            if status not in seen:
                generations.add_metric([status, ""], 0)
        yield generations
        yield GaugeMetricFamily(
            "ai_handler_credits_held",
            "Credits reserved by holds that have not ended, over every account",
            value=int(held),
        )
        yield GaugeMetricFamily(
            "ai_handler_credits_balance",
            "Credits granted and not spent, over every account (held ones included)",
            value=int(balance),
        )
        histogram = GaugeHistogramMetricFamily(
            "ai_handler_generation_settle_seconds",
            "Submit to terminal status of the generations that ended in the last "
            f"{int(SETTLE_WINDOW.total_seconds())} seconds, by their status",
            labels=["status"],
        )
        for status, row in settle.items():
            buckets = [
                (floatToGoString(b), float(n))
                for b, n in zip(SETTLE_BUCKETS, row[:-2], strict=True)
            ]
            buckets.append(("+Inf", float(row[-2])))
            histogram.add_metric([status], buckets, gsum_value=float(row[-1]))
        yield histogram

    def _settle_rows(self, session: Session) -> dict[str, tuple[float, ...]]:
        seconds = _settle_seconds(self.engine.dialect.name)
        since = utcnow() - SETTLE_WINDOW
        rows = session.execute(
            sa.select(
                Generation.status,
                *(
                    sa.func.coalesce(sa.func.sum(sa.case((seconds <= b, 1), else_=0)), 0)
                    for b in SETTLE_BUCKETS
                ),
                sa.func.count(),
                sa.func.coalesce(sa.func.sum(seconds), 0.0),
            )
            .where(Generation.finished_at >= since, Generation.status.in_(TERMINAL))
            .group_by(Generation.status)
        ).all()
        found = {str(r[0]): tuple(float(v) for v in r[1:]) for r in rows}
        for status in TERMINAL:
            found.setdefault(str(status), (0.0,) * (len(SETTLE_BUCKETS) + 2))
        return found


class _Registered(Collector):
    """Everything registered in prometheus-client's default registry (this process's metrics:
    ours, other modules', the process collectors)."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()


def registry_for_scrape(engine: sa.Engine) -> CollectorRegistry:
    """A registry with every metric to expose at this scrape: every worker's (multiprocess
    mode) or this process's, and the database's."""
    registry = CollectorRegistry(auto_describe=False)
    if os.environ.get(MULTIPROC_DIR_VAR):
        MultiProcessCollector(registry)
    else:
        registry.register(_Registered())
    registry.register(DatabaseCollector(engine))
    return registry
