"""The embedded stack as the proving tools drive it: from outside, as an operator or a fault would.

:class:`ProvingStack` is the :class:`~ai_handler_dagster.devstack.stack.Stack` of ``ai-handler
dev`` and ``demo``, plus what only the benchmark, the chaos soak and the fault-injecting tests use:
the pids of every process it runs (memory and CPU figures, which run workers to kill) and process
faults (a daemon crash, an S3 restart).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from ai_handler_dagster.devstack.stack import Stack


class ProvingStack(Stack):
    """A :class:`Stack` that can be measured and disturbed."""

    def restart_s3(self) -> None:
        """Stop and start the local S3 endpoint on the same port (chaos: an S3 outage)."""
        port = int(self.s3_url.rsplit(":", 1)[1])
        self._terminate("s3")
        self._spawn_s3(port)
        self._wait_for_bucket()

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
