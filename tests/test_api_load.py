"""A small ``ai-handler bench --api-load`` through the real service (``ai-handler serve`` with two
workers on a scratch PostgreSQL database).

Proves that the load's report has every figure, that every submit was accepted and audited
(each accepted id exists once with its hold, nothing else was written, the ledger verifies), and
that the pass/fail verdict fails a run where a submit was refused. The figures are not asserted:
benchmarks measure, tests check behaviour.
"""

from __future__ import annotations

import json

import pytest

from ai_handler_dagster import cli
from ai_handler_dagster.proving import api_load

pytestmark = [pytest.mark.slow]


def test_a_small_load_run_accepts_and_audits_every_submit(
    pg_available: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    if not pg_available:
        pytest.skip("PostgreSQL is not reachable")
    from tests.support.db import PG_ADMIN_URL

    code = cli.main(
        [
            *("bench", "--api-load", "--count", "60", "--clients", "4", "--users", "10"),
            *("--health-count", "40", "--quiet", "--pg-url", PG_ADMIN_URL),
        ]
    )
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])
    assert code == 0, out
    assert report["submit"]["statuses"] == {"202": 60}
    assert report["submit"]["requests"] == 60 and report["submit"]["per_s"] > 0
    for phase in ("submit", "healthz_before", "healthz_after"):
        assert {"p50_ms", "p95_ms", "p99_ms", "per_s"} <= set(report[phase])
    assert report["audit"] == {
        "accepted": 60,
        "accepted_distinct": 60,
        "generations": 60,
        "missing": 0,
        "without_their_hold": 0,
        "not_accepted_but_written": 0,
        "ledger_violations": 0,
    }
    # The verdict fails a run where any submit was not accepted, however clean the audit.
    refused = {**report, "submit": {**report["submit"], "statuses": {"202": 59, "429": 1}}}
    assert api_load.ok(report) and not api_load.ok(refused)


def test_a_load_run_with_the_pipeline_waits_for_every_generation_to_end(
    pg_available: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    if not pg_available:
        pytest.skip("PostgreSQL is not reachable")
    from tests.support.db import PG_ADMIN_URL

    code = cli.main(
        [
            *("bench", "--api-load", "--pipeline", "--count", "40", "--clients", "4"),
            *("--users", "5", "--health-count", "40", "--latency", "0.3", "--concurrency", "16"),
            *("--quiet", "--pg-url", PG_ADMIN_URL),
        ]
    )
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])
    assert code == 0, out
    assert report["pipeline"] is True and report["settled_s"] >= 0
    assert report["audit"] == {
        "accepted": 40,
        "accepted_distinct": 40,
        "generations": 40,
        "missing": 0,
        "statuses": {"succeeded": 40},
        "holds_still_pending": 0,
        "not_accepted_but_written": 0,
        "ledger_violations": 0,
    }
    # The verdict fails a run where a generation did not succeed, however clean the ledger.
    one_failed = {
        **report,
        "audit": {**report["audit"], "statuses": {"succeeded": 39, "failed": 1}},
    }
    assert api_load.ok(report) and not api_load.ok(one_failed)
