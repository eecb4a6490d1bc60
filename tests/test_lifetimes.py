"""One formula for how long holds, predictions and runs live (``lifetimes.py``).

Regression (traced): holds lived a fixed 2 h whatever the settings, the prediction deadline had
no upper bound, each retry of the await step restarted the deadline, and a metered model's
``max_seconds`` was not enforced at the provider (``demo/haiku-text`` could run 1800 s while its
charge is capped at 30 s). So a hold could expire under a generation that was still working, and
a run could be killed by run monitoring while its prediction was within its deadline.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from ai_handler_dagster import instance, lifetimes, settings
from ai_handler_dagster.pricing import parse_pricing
from ai_handler_dagster.settings import ConfigError

PRICES = parse_pricing(
    '[models."a/fixed"]\ncredits = 5\n'
    '[models."a/metered"]\ncredits_per_second = 2\nmax_seconds = 30\n'
    '[models."a/long"]\ncredits_per_second = 1\nmax_seconds = 7200\n'
)


def test_a_metered_model_is_canceled_soon_after_what_can_be_charged() -> None:
    metered, fixed, long = (PRICES.price_for(m) for m in ("a/metered", "a/fixed", "a/long"))
    assert lifetimes.prediction_deadline_s(metered) == 30 + lifetimes.BOOT_ALLOWANCE_S
    assert lifetimes.cancel_after_s(metered) == 30 + 300 + 60
    # A fixed price, or a max_seconds beyond the deadline, gets the deadline itself.
    assert lifetimes.prediction_deadline_s(fixed) == settings.prediction_deadline_s() == 1800
    assert lifetimes.prediction_deadline_s(long) == 1800
    assert lifetimes.cancel_after_s(None) == 1860


def test_a_hold_outlives_its_queue_its_run_and_the_refunds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert lifetimes.hold_lifetime(3600) == timedelta(seconds=900 + 3600 + 600)
    monkeypatch.setenv("AI_HANDLER_QUEUE_ALLOWANCE_S", "60")
    assert lifetimes.hold_lifetime(1000) == timedelta(seconds=60 + 1000 + 600)
    # No maximum on the instance: the shortest run that fits a deadline.
    assert lifetimes.hold_lifetime(None) == timedelta(seconds=60 + 1800 + 600 + 600)


def test_the_shipped_instance_fits_the_default_deadline() -> None:
    lifetimes.check_instance(instance.shipped_settings())


def test_a_run_that_cannot_outlive_a_deadline_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AI_HANDLER_PREDICTION_DEADLINE_S", "7200")
    with pytest.raises(ConfigError, match=r"max_runtime_seconds is 3600.*7800 s at least"):
        lifetimes.check_instance(instance.shipped_settings())
    off = instance.apply_overrides(instance.shipped_settings(), {"run_monitoring.enabled": False})
    with pytest.raises(ConfigError, match="run_monitoring must be enabled"):
        lifetimes.check_instance(off)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("AI_HANDLER_PREDICTION_DEADLINE_S", "100000", "at most 21600"),
        ("AI_HANDLER_PREDICTION_DEADLINE_S", "5", "at least 10"),
        ("AI_HANDLER_QUEUE_ALLOWANCE_S", "-1", "at least 0"),
    ],
)
def test_deadline_settings_are_bounded(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=message):
        lifetimes.hold_lifetime(None)
