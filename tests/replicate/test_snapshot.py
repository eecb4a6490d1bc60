"""Prediction snapshots: built from raw JSON, their properties, the error a finished one stands
for, and the provider's timestamps (nanoseconds included)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from ai_handler_dagster import errors
from ai_handler_dagster.replicate.snapshot import PredictionSnapshot, parse_time, snapshot_error


def _snapshot(**overrides: Any) -> PredictionSnapshot:
    data: dict[str, Any] = {
        "id": "p1",
        "status": "succeeded",
        "model": "demo/pixel-sketch",
        "version": "v1",
        "output": ["https://example.test/out.png"],
        "metrics": {"predict_time": 1.25},
        "urls": {"web": "https://replicate.com/p/p1", "get": "x"},
        "created_at": "2025-01-01T00:00:00.123456789Z",
    }
    data.update(overrides)
    return PredictionSnapshot.from_json(data)


def test_parse_time_accepts_nanoseconds() -> None:
    assert parse_time("2025-01-01T00:00:00.123456789Z") == pytest.approx(1735689600.123456)
    assert parse_time("2025-01-01T00:00:00+00:00") == 1735689600.0
    assert parse_time("2025-01-01T00:00:00") is None  # no zone: cannot compare clocks
    assert parse_time(None) is None


def test_snapshot_properties_and_errors() -> None:
    ok = _snapshot()
    assert ok.is_terminal and ok.predict_time == 1.25 and ok.web_url == "https://replicate.com/p/p1"
    assert ok.raw["created_at"].endswith("Z")
    assert snapshot_error(ok) is None
    assert snapshot_error(_snapshot(status="processing")) is None
    assert not _snapshot(status="starting").is_terminal

    failed = snapshot_error(_snapshot(status="failed", error="CUDA out of memory"))
    assert failed is not None and failed.code == errors.PREDICTION_FAILED
    assert "CUDA out of memory" in failed.message
    canceled = snapshot_error(_snapshot(status="canceled"))
    assert canceled is not None and canceled.code == errors.PREDICTION_CANCELED
    aborted = _snapshot(status="aborted")
    assert aborted.is_terminal and snapshot_error(aborted).code == errors.PREDICTION_CANCELED  # type: ignore[union-attr]
    expired = snapshot_error(_snapshot(output=None, data_removed=True))
    assert expired is not None and expired.code == errors.OUTPUT_EXPIRED
    marked = dataclasses.replace(_snapshot(status="canceled"), deadline_exceeded=True)
    assert snapshot_error(marked).code == errors.DEADLINE_EXCEEDED  # type: ignore[union-attr]
