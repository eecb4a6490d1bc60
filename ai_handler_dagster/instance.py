"""The Dagster instance: one file of settings, the storage chosen where the instance is made.

The repository's ``dagster.yaml`` holds every instance setting except ``storage``: run queue,
concurrency and pools, the run launcher, run monitoring and retries, sensor and schedule threads.
Without storage it is a complete instance on Dagster's default (SQLite files in the instance
folder), so Dagster's own commands work in the repository root as they do in any Dagster project
(``dagster dev``, ``dagster definitions validate -w workspace.yaml``, ``dg check defs``).

Dagster's configuration has no fallback for ``storage`` (a setting read from an unset environment
variable is an error), so storage is added where an instance folder is made, always on top of the
same settings:

- production: ``ai-handler instance write DIR`` writes ``DIR/dagster.yaml``, the shipped settings
  plus PostgreSQL storage read from ``DAGSTER_PG_URL`` each time a Dagster process starts (the
  file holds the variable's name, never the URL); point ``DAGSTER_HOME`` at ``DIR``;
- the embedded stack (``ai-handler dev`` and ``demo``, the bench, the chaos soak, the end-to-end
  tests) writes its instance into its state folder: SQLite, or a local PostgreSQL database, plus
  the overrides it names, each a dotted key of the shipped file (``local_config``).

A command-line option that changes an instance setting (``bench --max-runs``) is such an
override too; ``bench`` and ``chaos`` print every override they apply.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import yaml

from ai_handler_dagster.settings import ConfigError

#: The repository the package runs from: the shipped instance settings and code location.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
SETTINGS_FILE = PROJECT_ROOT / "dagster.yaml"
WORKSPACE_FILE = PROJECT_ROOT / "workspace.yaml"

#: The environment variable production's instance reads its PostgreSQL URL from.
PG_URL_VAR = "DAGSTER_PG_URL"


@dataclass(frozen=True)
class Override:
    """A local change to one shipped setting, and why it is made."""

    value: Any
    reason: str


#: What the end-to-end tests change in the shipped settings, and nothing else
#: (``tests/test_instance.py`` pins this set; the dev stack, bench and chaos change none of it).
TEST_OVERRIDES: dict[str, Override] = {
    "run_monitoring.poll_interval_seconds": Override(
        3, "crash tests see a killed worker within seconds instead of one 10 s poll"
    ),
}


def shipped_settings() -> dict[str, Any]:
    """The repository's ``dagster.yaml`` as a dict (a fresh copy on every call)."""
    try:
        text = SETTINGS_FILE.read_text()
    except FileNotFoundError:
        raise ConfigError(
            f"{SETTINGS_FILE} is missing: the project runs from its repository, "
            "which holds the Dagster instance settings"
        ) from None
    settings = yaml.safe_load(text)
    if not isinstance(settings, dict):
        raise ConfigError(f"{SETTINGS_FILE} is not a mapping of settings")
    if "storage" in settings:
        raise ConfigError(
            f"{SETTINGS_FILE} must not name a storage: it is added where an instance is made "
            "(ai-handler instance write for production)"
        )
    return settings


def _set(settings: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in ``settings``; the key must exist in the shipped file (no typos pass)."""
    *parents, leaf = dotted.split(".")
    node: Any = settings
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            break
    if not isinstance(node, dict) or leaf not in node:
        raise ConfigError(f"{dotted!r} is not a setting of {SETTINGS_FILE.name}")
    node[leaf] = value


def apply_overrides(settings: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``settings`` with each dotted key of ``overrides`` replaced."""
    out = copy.deepcopy(dict(settings))
    for dotted, value in overrides.items():
        _set(out, dotted, value.value if isinstance(value, Override) else value)
    return out


#: SQLAlchemy driver names that mean psycopg 3 (a bare ``postgresql://`` does on SQLAlchemy 2.1).
_PSYCOPG3_DRIVERS = ("postgresql", "postgres", "postgresql+psycopg")


def dagster_postgres_url(url: str) -> str:
    """``url`` with the psycopg2 driver named, as dagster-postgres needs it.

    dagster-postgres hands the URL to SQLAlchemy as is and writes every event with
    ``NOTIFY run_events, :notify_id``. On psycopg 3 (what SQLAlchemy 2.1 picks for a bare
    ``postgresql://``) that parameter is bound on the server, which PostgreSQL refuses in
    ``NOTIFY`` ("syntax error at or near $1"): no event is stored and no run can start.
    psycopg2 binds on the client side, so the statement works.
    """
    parsed = sa.make_url(url)
    if parsed.drivername in _PSYCOPG3_DRIVERS:
        parsed = parsed.set(drivername="postgresql+psycopg2")
    return parsed.render_as_string(hide_password=False)


def production_config() -> dict[str, Any]:
    """Production's instance: the shipped settings, PostgreSQL storage from ``DAGSTER_PG_URL``."""
    return {"storage": {"postgres": {"postgres_url": {"env": PG_URL_VAR}}}, **shipped_settings()}


def local_config(
    *, postgres_url: str | None = None, overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """A local instance: the shipped settings with ``overrides``, on SQLite (Dagster's default)
    or on the PostgreSQL database at ``postgres_url``."""
    settings = apply_overrides(shipped_settings(), overrides or {})
    if postgres_url is None:
        return settings
    return {
        "storage": {"postgres": {"postgres_url": dagster_postgres_url(postgres_url)}},
        **settings,
    }


def write(home: Path, config: Mapping[str, Any]) -> Path:
    """Write ``config`` as ``home/dagster.yaml`` (the folder is created) and return its path."""
    home.mkdir(parents=True, exist_ok=True)
    path = home / "dagster.yaml"
    header = (
        f"# Written by ai-handler from the repository's {SETTINGS_FILE.name}; change that file\n"
        "# and write this one again rather than editing it.\n"
    )
    path.write_text(header + yaml.safe_dump(dict(config), sort_keys=False))
    return path


def flatten(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a.b.c": value}`` for every leaf of a nested mapping."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def differences(config: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of ``config`` (storage aside) that differ from the shipped file's."""
    shipped = flatten(shipped_settings())
    mine = flatten({k: v for k, v in config.items() if k != "storage"})
    keys = set(shipped) | set(mine)
    return {k: mine.get(k) for k in sorted(keys) if shipped.get(k) != mine.get(k)}


def check_production_storage(home: str | os.PathLike[str] | None) -> None:
    """Refuse a production instance whose storage is not PostgreSQL.

    Without a ``storage`` block Dagster quietly keeps runs and events in SQLite files under
    ``DAGSTER_HOME`` (for example when it points at the repository root): one host's disk,
    lost with it, and no shared state between the daemon and the webserver.
    """
    if home is None:
        raise ConfigError("DAGSTER_HOME must be set in production (ai-handler instance write DIR)")
    path = Path(home) / "dagster.yaml"
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(
            f"{path} is missing; write it with: ai-handler instance write {home}"
        ) from None
    storage = config.get("storage") if isinstance(config, dict) else None
    if not isinstance(storage, dict) or "postgres" not in storage:
        raise ConfigError(
            f"{path} has no PostgreSQL storage, so Dagster would keep runs in local SQLite "
            f"files; write the production instance with: ai-handler instance write {home}"
        )
