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
