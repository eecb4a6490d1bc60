"""``python -m ai_handler_dagster.runtime.daemon run -w workspace.yaml``: ``dagster-daemon`` with
tighter loops.

Dagster's sensor daemon evaluates sensors at most once every 5 seconds, whatever a sensor's
``minimum_interval_seconds``; a request waits 2.5 s on average before anything sees it. For a queue
of paid requests that is most of the idle latency, so this entry point runs the same daemon with the
loop period from ``AI_HANDLER_SENSOR_LOOP_S`` (default 0.25 s). The loop only checks which sensors
are due; each sensor still ticks at its own ``minimum_interval_seconds`` (the request sensor: every
second), and a fine loop keeps a tick from slipping to the next whole period. Likewise the run
queue is read every ``AI_HANDLER_DEQUEUE_LOOP_S`` (default 0.5 s; ``dagster.yaml`` only takes whole
seconds). Everything else is ``dagster-daemon`` unchanged; plain ``dagster-daemon run`` works too,
with the 5 s sensor loop and the configured dequeue interval.

It also wakes the request sensor and the run queue when a request becomes pending, instead of
leaving it to their next pass (``runtime/wake.py``; ``AI_HANDLER_SENSOR_WAKE=0`` turns it off).

With ``AI_HANDLER_ENV=production`` it first refuses an instance without PostgreSQL storage
(``instance.check_production_storage``). It also starts the run launcher's warm process (see
``runtime/launcher.py``) before the first run needs it.

The sensor period lives in a module constant of Dagster's sensor daemon
(``MIN_INTERVAL_LOOP_TIME``), the dequeue period in the run coordinator's
``dequeue_interval_seconds``; if a Dagster upgrade removes either, this entry point says so and
runs the stock behaviour.
"""

from __future__ import annotations

import os
import sys


def _tighten_sensor_loop() -> None:
    import dagster._daemon.sensor as sensor_daemon

    period = float(os.environ.get("AI_HANDLER_SENSOR_LOOP_S", "0.25"))
    if not hasattr(sensor_daemon, "MIN_INTERVAL_LOOP_TIME"):
        sys.stderr.write(
            "ai_handler_dagster.runtime.daemon: sensor loop period not adjustable here\n"
        )
        return
    sensor_daemon.MIN_INTERVAL_LOOP_TIME = period  # type: ignore[assignment]


def _tighten_dequeue_loop() -> None:
    from dagster._core.run_coordinator.queued_run_coordinator import QueuedRunCoordinator

    period = float(os.environ.get("AI_HANDLER_DEQUEUE_LOOP_S", "0.5"))
    if not isinstance(getattr(QueuedRunCoordinator, "dequeue_interval_seconds", None), property):
        sys.stderr.write("ai_handler_dagster.runtime.daemon: dequeue period not adjustable here\n")
        return
    QueuedRunCoordinator.dequeue_interval_seconds = property(  # type: ignore[method-assign,assignment]
        lambda _self: period
    )


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
        sys.stderr.write(f"ai_handler_dagster.runtime.daemon: run launcher not warmed up: {exc}\n")


def _check_instance() -> None:
    """Refuse an instance whose runs cannot outlive a prediction's deadline (``lifetimes.py``),
    and in production one without PostgreSQL storage (``instance.py``)."""
    from pathlib import Path

    import yaml

    from ai_handler_dagster import instance, lifetimes, settings

    home = os.environ.get("DAGSTER_HOME")
    try:
        if settings.environment() is settings.Environment.PRODUCTION:
            instance.check_production_storage(home)
        config_file = Path(home) / "dagster.yaml" if home else None
        if config_file is not None and config_file.exists():
            lifetimes.check_instance(yaml.safe_load(config_file.read_text()) or {})
    except settings.ConfigError as exc:
        sys.stderr.write(f"error: {exc}\n")
        raise SystemExit(2) from None


def _wake_on_pending() -> None:
    """Wake the request sensor and the run queue when a request becomes pending
    (``runtime/wake.py``), unless ``AI_HANDLER_SENSOR_WAKE=0``."""
    import sqlalchemy as sa

    from ai_handler_dagster import settings
    from ai_handler_dagster.db.engine import make_engine
    from ai_handler_dagster.runtime import wake

    try:
        if not settings.sensor_wake():
            return
        url = settings.database_url()
        engine = make_engine(url)
        poll_ms = settings.sensor_wake_poll_ms() if engine.dialect.name == "sqlite" else 0
    except settings.ConfigError as exc:
        sys.stderr.write(f"error: {exc}\n")
        raise SystemExit(2) from None
    except Exception as exc:  # an optimisation must never stop the daemon
        sys.stderr.write(f"ai_handler_dagster.runtime.daemon: no wake-ups: {exc}\n")
        return
    wakes = wake.Wakes()
    if wake.install(wakes):
        shown = sa.make_url(url).render_as_string(hide_password=True)
        sys.stderr.write(f"ai_handler_dagster.runtime.daemon: wake-ups from {shown}\n")
        wake.PendingWatcher(engine, wakes.wake_sensor, poll_ms=poll_ms or 100).start()


def main() -> None:
    _check_instance()
    _tighten_sensor_loop()
    _tighten_dequeue_loop()
    _wake_on_pending()
    _warm_run_launcher()
    from dagster._daemon.cli import main as daemon_main

    daemon_main()


if __name__ == "__main__":
    main()
