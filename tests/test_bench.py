"""A small benchmark run through the real stack (PostgreSQL, emulator, local S3, daemon).

Proves that ``ai-handler bench --json`` produces every field of its report with sane values, that
every generation of the workload settles, and that the ledger is clean afterwards. The figures
themselves are not asserted: benchmarks measure, tests check behaviour.
"""

from __future__ import annotations

import json

import pytest

from ai_handler_dagster import cli
from ai_handler_dagster.proving.bench import REPORT_KEYS

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_bench_smoke_run_reports_every_field(
    pg_available: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    if not pg_available:
        pytest.skip("PostgreSQL is not reachable")
    from tests.support.db import PG_ADMIN_URL

    code = cli.main(
        [
            "bench",
            "--count",
            "20",
            "--latency",
            "0.5",
            "--concurrency",
            "8",
            "--idle-samples",
            "1",
            "--pg-url",
            PG_ADMIN_URL,
            "--json",
            "--quiet",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads(out.strip().splitlines()[-1])
    for key in REPORT_KEYS:
        assert key in report, key
    assert report["count"] == 20
    assert report["statuses"] == {"succeeded": 20}
    assert report["ledger_violations"] == 0
    assert report["wall_s"] > 0
    assert report["throughput"] == pytest.approx(20 / report["wall_s"], rel=0.01)
    assert 0 < report["efficiency"] <= 1.0
    assert report["latency_p50_s"] <= report["latency_p95_s"]
    assert report["latency_p50_s"] >= 0.5  # nothing finishes faster than the model runs
    assert report["api_calls_per_generation"] >= 1  # at least the create (webhooks do the rest)
    assert report["peak_rss_mib"] > 100  # the daemon and code server alone are bigger


def test_a_rate_limited_bench_paces_creates_and_fails_none(
    pg_available: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    """``bench --rate-limit``, scaled down (120 creates a minute, a burst of 2): the emulator
    refuses creates beyond its limit, yet every generation succeeds, none fails for rate
    limiting, and the report gives the steady window and the creates a minute in it."""
    if not pg_available:
        pytest.skip("PostgreSQL is not reachable")
    from tests.support.db import PG_ADMIN_URL

    code = cli.main(
        [
            "bench",
            "--count",
            "20",
            "--latency",
            "0.3",
            "--concurrency",
            "8",
            "--idle-samples",
            "0",
            "--rate-limit",
            "120",
            "--rate-burst",
            "2",
            "--pg-url",
            PG_ADMIN_URL,
            "--json",
            "--quiet",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads(out.strip().splitlines()[-1])
    assert report["statuses"] == {"succeeded": 20}
    assert report["ledger_violations"] == 0
    rate = report["rate_limit"]
    assert (rate["per_minute"], rate["burst"], rate["creates"]) == (120, 2, 20)
    assert rate["failed_rate_limited"] == 0 and rate["failed_queue_deadline"] == 0
    assert rate["create_requests"] == 20 + rate["creates_answered_429"]
    assert 0 <= rate["create_429_fraction"] < 1
    start, end = rate["steady_window_s"]
    assert 0 <= start < end
    # The emulator lets no more through than its limit; the throttle gets close to it.
    assert 0 < rate["steady_creates_per_min"] <= 120 * 1.05
    assert report["overrides"]["app"]["AI_HANDLER_CREATE_RATE_PER_MIN"] == "120"


def test_rate_burst_needs_rate_limit(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "--rate-burst", "2"]) == 2
    assert "--rate-burst needs --rate-limit" in capsys.readouterr().err


def test_the_steady_window_starts_once_the_burst_is_spent() -> None:
    from ai_handler_dagster.proving.bench import steady_window

    # Three at once empty a bucket of three; then one a second: 60 a minute from t = 0.
    assert steady_window([0.0, 0.0, 0.0, 1.0, 2.0, 3.0], 60, 3) == (0.0, 3.0, 3)
    # Slower than the limit: the bucket never runs dry, there is no steady state to measure.
    assert steady_window([0.0, 2.0, 4.0, 6.0], 60, 3) is None


def test_idle_api_bench_reports_every_phase_for_both_runs(
    pg_available: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    if not pg_available:
        pytest.skip("PostgreSQL is not reachable")
    from ai_handler_dagster.proving.idle_api import PHASES
    from tests.support.db import PG_ADMIN_URL

    code = cli.main(
        [
            *("bench", "--idle-api", "--idle-samples", "2", "--latency", "0.5"),
            *("--pg-url", PG_ADMIN_URL, "--json", "--quiet"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads(out.strip().splitlines()[-1])
    assert report["samples"] == 2
    for run in ("wake_off", "wake_on"):
        assert set(report[run]) == set(PHASES), run
        for phase, figures in report[run].items():
            assert figures["p50"] <= figures["p95"], (run, phase)
        # Through the service the terminal event comes after the create, which comes after
        # the run started, and nothing ends sooner than the model runs.
        assert report[run]["to_terminal"]["p50"] > report[run]["to_create"]["p50"] > 0
        assert report[run]["to_terminal"]["p50"] >= 0.5
    assert set(report["on_over_off"]) == set(PHASES)
