"""``python -m ai_handler_dagster.daemon run -w workspace.yaml``: ``dagster-daemon`` with a
tighter sensor loop.

Dagster's sensor daemon evaluates sensors at most once every 5 seconds, whatever a sensor's
``minimum_interval_seconds``; a request waits 2.5 s on average before anything sees it. For a queue
of paid requests that is most of the idle latency, so this entry point runs the same daemon with the
loop period from ``AI_HANDLER_SENSOR_LOOP_S`` (default 1 s). Everything else is ``dagster-daemon``
unchanged; plain ``dagster-daemon run`` works too, with the 5 s loop.

It also starts the run launcher's warm process (see ``ai_handler_dagster.launcher``) before the
first run needs it.

The period lives in a module constant of Dagster's sensor daemon (``MIN_INTERVAL_LOOP_TIME``); if
a Dagster upgrade removes it this entry point says so and runs the stock daemon.
"""

from __future__ import annotations

import os
import sys


def _tighten_sensor_loop() -> None:
    import dagster._daemon.sensor as sensor_daemon

    period = float(os.environ.get("AI_HANDLER_SENSOR_LOOP_S", "1"))
    if not hasattr(sensor_daemon, "MIN_INTERVAL_LOOP_TIME"):
        sys.stderr.write("ai_handler_dagster.daemon: sensor loop period not adjustable here\n")
        return
    sensor_daemon.MIN_INTERVAL_LOOP_TIME = period  # type: ignore[assignment]


def _warm_run_launcher() -> None:
    """Start the run launcher's warm process now, so the first run does not wait for its imports.

    Only launchers that have one (``LocalRunLauncher``) are warmed; any problem here is reported
    and left to the launcher, which starts the process on first use anyway.
    """
    try:
        from dagster import DagsterInstance

        with DagsterInstance.get() as instance:
            warm_up = getattr(instance.run_launcher, "warm_up", None)
            if warm_up is not None:
                warm_up()
    except Exception as exc:  # an optimisation must never stop the daemon
        sys.stderr.write(f"ai_handler_dagster.daemon: run launcher not warmed up: {exc}\n")


def main() -> None:
    _tighten_sensor_loop()
    _warm_run_launcher()
    from dagster._daemon.cli import main as daemon_main

    daemon_main()


if __name__ == "__main__":
    main()
