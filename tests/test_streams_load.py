"""A small ``ai-handler bench --streams`` through the real service (``ai-handler serve`` with two
workers on a scratch PostgreSQL database).

Proves that every stream opened with a user token and received its first event, that the one
cancel reached every stream as its terminal event and each stream then ended, that the report
has every figure for the idle service and with the streams, and that the verdict fails a run
where a stream missed its terminal event. The figures are not asserted: benchmarks measure,
tests check behaviour.
"""

from __future__ import annotations

import json

import pytest

from ai_handler_dagster import cli
from ai_handler_dagster.proving import streams_load

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_a_small_streams_run_delivers_every_terminal_event(
    pg_available: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    if not pg_available:
        pytest.skip("PostgreSQL is not reachable")
    from tests.support.db import PG_ADMIN_URL

    code = cli.main(
        [
            *("bench", "--streams", "20", "--stream-window", "2", "--users", "5"),
            *("--quiet", "--pg-url", PG_ADMIN_URL),
        ]
    )
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])
    assert code == 0, out
    assert (report["streams"], report["users"], report["api_workers"]) == (20, 5, 2)
    assert report["open"] == {
        **report["open"],
        "all_within_timeout": True,
        "answered_200": 20,
        "first_event": 20,
        "first_event_pending": 20,
    }
    terminal = report["terminal"]
    assert terminal == {
        **terminal,
        "canceled_in_db": 20,
        "received": 20,
        "received_canceled": 20,
        "missed": 0,
        "ended": 20,
        "still_open": 0,
    }
    assert 0 < terminal["p50_ms"] <= terminal["p95_ms"] <= terminal["max_ms"]
    assert report["errors"] == {}
    for name in ("idle", "streaming"):
        window = report[name]
        assert window["window_s"] >= 2
        roles = [p["role"] for p in window["processes"]]
        assert roles.count("serve") == 1 and roles.count("worker") == 2
        assert all(p["rss_mib"] > 0 and p["cpu_s"] >= 0 for p in window["processes"])
        assert window["rss_total_mib"] > 0 and window["cpu_s"] >= 0
        # One listening connection per worker, whether streams are open or not.
        assert window["db_connections"]["listening"] == 2
        assert window["db_connections"]["total"] >= 2
        assert {"db_transactions", "table_scans", "pings_received"} <= set(window)
        assert set(window["table_scans"]) == {"generations", "generation_events", "all_tables"}
    # Every stream is a client of one worker while they are open, and of none before.
    workers = [p for p in report["streaming"]["processes"] if p["role"] == "worker"]
    assert sum(p["clients"] for p in workers) == 20
    assert all(p["clients"] == 0 for p in report["idle"]["processes"])
    # The verdict fails a run where one stream missed its terminal event or did not end.
    missed = {
        **report,
        "terminal": {**terminal, "received": 19, "received_canceled": 19, "missed": 1},
    }
    unended = {**report, "terminal": {**terminal, "ended": 19}}
    assert streams_load.ok(report)
    assert not streams_load.ok(missed) and not streams_load.ok(unended)
