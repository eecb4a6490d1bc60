"""What the proving tools run on: the embedded stack, driven from outside as an operator or a
fault would, and throwaway PostgreSQL databases for it.

:class:`ProvingStack` is the :class:`~ai_handler_dagster.devstack.stack.Stack` of ``ai-handler
dev`` and ``demo``, plus what only the benchmark, the chaos soak and the fault-injecting tests use:
the pids of every process it runs (memory and CPU figures, which run workers to kill) and process
faults (a daemon crash). :func:`scratch_databases` makes the app's database and
Dagster's storage on a PostgreSQL server (``--pg-url``) and drops them afterwards.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

from ai_handler_dagster.devstack.stack import Stack

#: The PostgreSQL server the proving tools make their databases on (their ``--pg-url``).
DEFAULT_PG_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"


@contextlib.contextmanager
def scratch_databases(
    pg_admin_url: str, prefix: str, *, keep: bool = False
) -> Iterator[tuple[str, str]]:
    """Two new databases on the server of ``pg_admin_url``: yields the URLs of the app's
    (``<prefix>_app_...``) and of Dagster's storage (``<prefix>_dagster_...``). Afterwards this
    process's engines are disposed of and both databases dropped, unless ``keep``."""
    from ai_handler_dagster.db.engine import dispose_engines
    from ai_handler_dagster.devstack.pg import drop_database, new_database

    app_url = new_database(pg_admin_url, f"{prefix}_app")
    dagster_url = new_database(pg_admin_url, f"{prefix}_dagster")
    try:
        yield app_url, dagster_url
    finally:
        dispose_engines()
        if not keep:
            drop_database(pg_admin_url, app_url)
            drop_database(pg_admin_url, dagster_url)


class ProvingStack(Stack):
    """A :class:`Stack` that can be measured and disturbed."""

    def restart_daemon(self) -> None:
        """Kill the daemon hard and start it again (chaos: a daemon crash)."""
        self._terminate("daemon", sig=signal.SIGKILL)
        self._start_daemon()

    def pids(self) -> list[int]:
        """Pids of every live process of the stack, children included (for memory figures)."""
        found: list[int] = []
        groups = {p.pid for p in self.processes.values() if p.poll() is None}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if os.getpgid(int(entry.name)) in groups:
                    found.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                continue
        return found
