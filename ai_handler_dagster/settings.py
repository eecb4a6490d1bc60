"""Every setting of the project, read from environment variables in one place.

The one environment switch is ``AI_HANDLER_ENV``: ``embedded`` (the default: SQLite, the Replicate
emulator and a local S3 endpoint under the state folder) or ``production`` (PostgreSQL, S3 and
Replicate). An unknown value is an error, never a silent default.

Settings are read when called, not at import time, so tests and the CLI can set them first.
Secrets (the Replicate token, S3 keys) are not read here: resources take them through
``dagster.EnvVar`` so they never reach run config, logs or metadata.
"""

from __future__ import annotations

import enum
import os
from decimal import Decimal, InvalidOperation
from pathlib import Path

from ai_handler_dagster.domain import MAX_PRIORITY, MIN_PRIORITY
from ai_handler_dagster.errors import AiHandlerError


class ConfigError(AiHandlerError, ValueError):
    """A setting has a value the project cannot use; the message says which and why."""


class Environment(enum.StrEnum):
    EMBEDDED = "embedded"
    PRODUCTION = "production"


ENV_VAR = "AI_HANDLER_ENV"
STATE_DIR_VAR = "AI_HANDLER_STATE_DIR"
DATABASE_URL_VAR = "AI_HANDLER_DATABASE_URL"
PRICING_FILE_VAR = "AI_HANDLER_PRICING_FILE"
CREDIT_VALUE_VAR = "AI_HANDLER_CREDIT_VALUE_USD"
#: What one credit is worth unless ``AI_HANDLER_CREDIT_VALUE_USD`` says otherwise.
DEFAULT_CREDIT_VALUE_USD = Decimal("0.01")


def environment() -> Environment:
    """The environment chosen by ``AI_HANDLER_ENV`` (default ``embedded``)."""
    raw = os.environ.get(ENV_VAR, Environment.EMBEDDED.value).strip().lower()
    try:
        return Environment(raw)
    except ValueError:
        allowed = ", ".join(e.value for e in Environment)
        raise ConfigError(f"{ENV_VAR}={raw!r} is not one of: {allowed}") from None


def state_dir() -> Path:
    """Local state folder (``AI_HANDLER_STATE_DIR``, default ``./.state``); created on demand."""
    path = Path(os.environ.get(STATE_DIR_VAR, ".state")).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def database_url() -> str:
    """SQLAlchemy URL of the app database (``AI_HANDLER_DATABASE_URL``).

    Default: a SQLite file ``app.db`` in the state folder. In production the URL is required and
    must name its driver explicitly (``postgresql+psycopg2://...``).
    """
    url = os.environ.get(DATABASE_URL_VAR)
    if url:
        return url
    if environment() is Environment.PRODUCTION:
        raise ConfigError(f"{DATABASE_URL_VAR} must be set when {ENV_VAR}=production")
    return f"sqlite:///{state_dir() / 'app.db'}"


def _int_setting(name: str, default: int, *, minimum: int = 1, maximum: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ConfigError(f"{name}={value} must be at least {minimum}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name}={value} must be at most {maximum}")
    return value


def max_batch_size() -> int:
    """Most generations one run processes (``AI_HANDLER_MAX_BATCH``, default 128).

    Each run costs seconds of process start-up, so a long queue is served in few, large runs;
    inside a run the generations progress concurrently."""
    return _int_setting("AI_HANDLER_MAX_BATCH", 128)


def max_in_flight() -> int:
    """Most generations queued or running at once (``AI_HANDLER_MAX_IN_FLIGHT``, default 384)."""
    return _int_setting("AI_HANDLER_MAX_IN_FLIGHT", 384)


def max_in_flight_per_user() -> int:
    """Most generations one user may have queued or running (``AI_HANDLER_MAX_IN_FLIGHT_PER_USER``,
    default 64), so one user's backlog cannot starve the others."""
    return _int_setting("AI_HANDLER_MAX_IN_FLIGHT_PER_USER", 64)


def small_backlog() -> int:
    """Backlog at or below which each generation gets a run of its own
    (``AI_HANDLER_SMALL_BACKLOG``, default 4): lowest latency and the clearest UI."""
    return _int_setting("AI_HANDLER_SMALL_BACKLOG", 4, minimum=0)


def sensor_interval_s() -> int:
    """Seconds between ticks of the request sensor (``AI_HANDLER_SENSOR_INTERVAL_S``, default 1)."""
    return _int_setting("AI_HANDLER_SENSOR_INTERVAL_S", 1)


def sensor_wake() -> bool:
    """Whether the daemon wakes the request sensor when a request becomes pending
    (``AI_HANDLER_SENSOR_WAKE``, ``1`` by default; ``0``: wait for the sensor's next tick, as
    before ``runtime/wake.py``)."""
    raw = os.environ.get("AI_HANDLER_SENSOR_WAKE", "1").strip()
    if raw not in ("0", "1"):
        raise ConfigError(f"AI_HANDLER_SENSOR_WAKE={raw!r} must be 0 or 1")
    return raw == "1"


def sensor_wake_poll_ms() -> int:
    """How often, in milliseconds, the daemon looks for new pending requests on SQLite, which
    cannot notify (``AI_HANDLER_SENSOR_WAKE_POLL_MS``, default 100). PostgreSQL needs none."""
    return _int_setting("AI_HANDLER_SENSOR_WAKE_POLL_MS", 100, minimum=10, maximum=60_000)


def default_priority() -> int:
    """Highest priority (and the priority of requests that name none) of a user the operator
    did not list with ``ai-handler priority set`` (``AI_HANDLER_DEFAULT_PRIORITY``, default 0,
    the lowest; at most 9)."""
    return _int_setting(
        "AI_HANDLER_DEFAULT_PRIORITY", MIN_PRIORITY, minimum=MIN_PRIORITY, maximum=MAX_PRIORITY
    )


def priority_aging_s() -> int:
    """Seconds a pending request waits before the request sensor claims it ahead of every
    priority, oldest first, so low priorities are never starved (``AI_HANDLER_PRIORITY_AGING_S``,
    default 600)."""
    return _int_setting("AI_HANDLER_PRIORITY_AGING_S", 600, minimum=1)


def db_pool_max() -> int:
    """Most connections one pool opens to the app database (``AI_HANDLER_DB_POOL_MAX``,
    default 16). Every run worker, sensor process and CLI has its own pool and an API worker
    two (the second for its key checks), so this times the number of pools must stay under the
    server's ``max_connections``."""
    return _int_setting("AI_HANDLER_DB_POOL_MAX", 16)


def executor() -> str:
    """Executor of the generation job (``AI_HANDLER_EXECUTOR``, default ``in_process``).

    ``in_process`` runs the ops of a run in its one process (about 2 s per run);
    ``multiprocess`` is Dagster's default (a process per op, about 7-8 s per run). Deprecated:
    the bench measures the naive design with its own code location (``proving/naive.py``).
    """
    value = os.environ.get("AI_HANDLER_EXECUTOR", "in_process").strip().lower()
    if value not in ("in_process", "multiprocess"):
        raise ConfigError(f"AI_HANDLER_EXECUTOR={value!r} is not one of: in_process, multiprocess")
    return value


def prediction_deadline_s() -> float:
    """Seconds a prediction may take, from its attempt's first create, before it is canceled
    and its generation refunded (``AI_HANDLER_PREDICTION_DEADLINE_S``, default 1800, 10 s to
    6 h; see ``lifetimes.py`` for what it bounds)."""
    return float(
        _int_setting("AI_HANDLER_PREDICTION_DEADLINE_S", 1800, minimum=10, maximum=6 * 3600)
    )


def queue_allowance_s() -> float:
    """Seconds a held generation may wait for its run's first create: the run queue and the
    ``replicate`` pool (``AI_HANDLER_QUEUE_ALLOWANCE_S``, default 900); part of a hold's
    lifetime (``lifetimes.py``)."""
    return float(_int_setting("AI_HANDLER_QUEUE_ALLOWANCE_S", 900, minimum=0, maximum=24 * 3600))


def create_rate_per_minute() -> int:
    """The provider's create limit, per minute (``AI_HANDLER_CREATE_RATE_PER_MIN``, default
    600, Replicate's): every run and process together start creates at most at this pace
    (``throttle.py``; a little under it, so that the provider's own bucket keeps a margin)."""
    return _int_setting("AI_HANDLER_CREATE_RATE_PER_MIN", 600, maximum=10**6)


def create_burst() -> int:
    """Most creates started at once after a quiet spell (``AI_HANDLER_CREATE_BURST``, default:
    a minute's worth of ``AI_HANDLER_CREATE_RATE_PER_MIN``, as Replicate lets bursts through)."""
    return _int_setting("AI_HANDLER_CREATE_BURST", create_rate_per_minute(), maximum=10**6)


#: The bucket outputs go to unless ``AI_HANDLER_S3_BUCKET`` names another.
DEFAULT_BUCKET = "ai-handler-outputs"


def s3_bucket() -> str:
    """Bucket for outputs and the values passed between ops (``AI_HANDLER_S3_BUCKET``)."""
    return os.environ.get("AI_HANDLER_S3_BUCKET", "").strip() or DEFAULT_BUCKET


def credit_value_usd() -> Decimal:
    """What one credit is worth in USD (``AI_HANDLER_CREDIT_VALUE_USD``, default 0.01): what
    users pay for credits, so that margin = credits charged x this - the provider's cost. Used
    for reporting only (run metadata, ``ai-handler usage``); it moves no credit. An exact
    decimal, more than 0 and at most 1000."""
    raw = os.environ.get(CREDIT_VALUE_VAR)
    if raw is None or raw.strip() == "":
        return DEFAULT_CREDIT_VALUE_USD
    try:
        value = Decimal(raw.strip())
    except InvalidOperation:
        raise ConfigError(f"{CREDIT_VALUE_VAR}={raw!r} is not a decimal number of USD") from None
    if not value.is_finite() or value <= 0 or value > 1000:
        raise ConfigError(f"{CREDIT_VALUE_VAR}={raw!r} must be more than 0 and at most 1000")
    return value


# --- the HTTP API (ai-handler serve) ------------------------------------------------------------


def api_rate_per_minute() -> int:
    """Requests a minute one API key may make unless the key has its own limit
    (``AI_HANDLER_API_RATE_PER_MIN``, default 6000); counted in the app database, so the limit
    holds across every worker and host."""
    return _int_setting("AI_HANDLER_API_RATE_PER_MIN", 6000, maximum=10**7)


def api_max_body_bytes() -> int:
    """Largest request body the API reads (``AI_HANDLER_API_MAX_BODY_BYTES``, default 1 MiB):
    a generation's input is at most 64 KiB as JSON; a webhook a few KiB."""
    return _int_setting("AI_HANDLER_API_MAX_BODY_BYTES", 1024 * 1024, minimum=1024)


def api_body_timeout_s() -> float:
    """Seconds a request body may take to arrive (``AI_HANDLER_API_BODY_TIMEOUT_S``, default
    10): a client sending a byte at a time is cut off instead of holding a worker."""
    return float(_int_setting("AI_HANDLER_API_BODY_TIMEOUT_S", 10, maximum=600))


def api_max_backlog_per_user() -> int:
    """Most generations one user may have waiting (pending or queued) for ``POST
    /v1/generations`` to accept another (``AI_HANDLER_API_MAX_BACKLOG_PER_USER``, default 1000);
    beyond it the API answers 429. Rows applications insert with SQL are not limited by it."""
    return _int_setting("AI_HANDLER_API_MAX_BACKLOG_PER_USER", 1000, maximum=10**6)


def api_max_backlog() -> int:
    """Most generations waiting (pending or queued) in all for ``POST /v1/generations`` to
    accept another (``AI_HANDLER_API_MAX_BACKLOG``, default 10000); beyond it the API answers
    429. The check counts at most this many rows, so it costs the same whatever the backlog."""
    return _int_setting("AI_HANDLER_API_MAX_BACKLOG", 10_000, maximum=10**6)


def api_output_link_ttl_s() -> int:
    """Seconds the presigned output links of ``GET /v1/generations/{id}`` stay valid
    (``AI_HANDLER_API_OUTPUT_LINK_TTL_S``, default 3600, 60 s to 7 days, the most S3 allows)."""
    return _int_setting("AI_HANDLER_API_OUTPUT_LINK_TTL_S", 3600, minimum=60, maximum=7 * 86400)


def api_events_poll_ms() -> int:
    """How often, in milliseconds, a worker on SQLite looks for new generation events for its
    open streams (``AI_HANDLER_API_EVENTS_POLL_MS``, default 250). One read per worker and
    period, whatever the number of streams; PostgreSQL needs none (``LISTEN/NOTIFY``)."""
    return _int_setting("AI_HANDLER_API_EVENTS_POLL_MS", 250, minimum=10, maximum=60_000)


def api_events_ping_s() -> int:
    """Seconds between the keep-alive comments of an idle event stream
    (``AI_HANDLER_API_EVENTS_PING_S``, default 15), so proxies do not close it."""
    return _int_setting("AI_HANDLER_API_EVENTS_PING_S", 15, maximum=300)


def s3_endpoint_url() -> str | None:
    """An S3-compatible endpoint instead of AWS's (``AI_HANDLER_S3_ENDPOINT_URL``; the embedded
    stack sets its local one), or None."""
    return os.environ.get("AI_HANDLER_S3_ENDPOINT_URL", "").strip() or None


def s3_region() -> str:
    """The S3 region (``AWS_REGION``, else ``AWS_DEFAULT_REGION``, else ``us-east-1``), as the
    code location's S3 resource reads it."""
    return os.environ.get("AWS_REGION", os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
