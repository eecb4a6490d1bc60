"""How long a hold, a prediction and a run may live, from one set of numbers.

A hold must outlive everything its generation may go through, or it expires under a generation
that is still working (and its output is then delivered free); a run must outlive the longest
prediction it may wait for, or run monitoring kills it mid-wait. So:

- prediction deadline: ``AI_HANDLER_PREDICTION_DEADLINE_S`` (D), counted from the attempt's
  first create, not from an op try; for a metered price it is at most ``max_seconds`` plus
  ``BOOT_ALLOWANCE_S`` (queueing and cold boots at the provider), since nothing beyond
  ``max_seconds`` is ever charged;
- ``Cancel-After`` of each create: the model's deadline plus ``CANCEL_AFTER_SLACK_S``; the
  provider counts it from creation, queue time included, and stops the prediction should we
  be gone (we cancel at the deadline ourselves);
- run lifetime: ``run_monitoring.max_runtime_seconds`` of the Dagster instance (R) must be at
  least D + ``FINISH_ALLOWANCE_S`` (waiting for a pool slot, downloading and storing the
  outputs, settling), checked when the daemon starts;
- hold lifetime: ``AI_HANDLER_QUEUE_ALLOWANCE_S`` (Q: from the hold to the run's first create,
  through the run queue and the ``replicate`` pool) + R + ``REFUND_MARGIN_S`` (for the refund
  paths of a run that died at its maximum);
- queue deadline: Q from the moment the request sensor queued the generation. A generation
  waiting for its turn at the create throttle (``throttle.py``) waits at most until then; past
  it, it fails with ``deadline_exceeded`` and is refunded. Throttling fails nothing else. A
  run that waited its whole allowance outlives its predictions when R >= Q + D +
  ``FINISH_ALLOWANCE_S`` (3300 s with the defaults; the daemon's check covers D + the finish).

With the defaults (D = 1800 s, Q = 900 s, R = 3600 s) a hold lives 5100 s.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from ai_handler_dagster import settings
from ai_handler_dagster.pricing import Price
from ai_handler_dagster.settings import ConfigError

#: Queueing and cold boots at the provider before a metered model starts its ``max_seconds``.
BOOT_ALLOWANCE_S = 300.0
#: How long after our own deadline the provider cancels by itself (``Cancel-After``).
CANCEL_AFTER_SLACK_S = 60.0
#: A run's time beyond the prediction deadline: a pool slot, storing outputs, settling.
FINISH_ALLOWANCE_S = 600.0
#: A hold's time beyond its run's maximum: the refund paths of a run that died at its limit.
REFUND_MARGIN_S = 600.0


def prediction_deadline_s(price: Price | None) -> float:
    """Seconds a prediction of this price may take, from its attempt's first create."""
    deadline = settings.prediction_deadline_s()
    if price is not None and price.max_seconds is not None:
        return min(deadline, float(price.max_seconds) + BOOT_ALLOWANCE_S)
    return deadline


def cancel_after_s(price: Price | None) -> float:
    """The ``Cancel-After`` a create of this price sends."""
    return prediction_deadline_s(price) + CANCEL_AFTER_SLACK_S


def queue_deadline(queued_at: datetime | None) -> datetime:
    """When a generation queued at ``queued_at`` (None: now) stops waiting for its first
    create: ``AI_HANDLER_QUEUE_ALLOWANCE_S`` later."""
    return (queued_at or datetime.now(UTC)) + timedelta(seconds=settings.queue_allowance_s())


def hold_lifetime(max_runtime_s: float | None) -> timedelta:
    """How long a hold lives, given the instance's ``max_runtime_seconds`` (None or 0: no
    maximum set, the shortest run that fits a deadline is assumed)."""
    runtime = max_runtime_s or settings.prediction_deadline_s() + FINISH_ALLOWANCE_S
    return timedelta(seconds=settings.queue_allowance_s() + runtime + REFUND_MARGIN_S)


@functools.cache
def _shipped_max_runtime_s() -> float | None:
    from ai_handler_dagster import instance

    monitoring = instance.shipped_settings().get("run_monitoring") or {}
    value = monitoring.get("max_runtime_seconds")
    return float(value) if value else None


def default_hold_lifetime() -> timedelta:
    """A hold's lifetime outside a run (at submit), from the shipped ``dagster.yaml``'s
    ``max_runtime_seconds``: what production's instance is written from."""
    return hold_lifetime(_shipped_max_runtime_s())


def check_instance(instance_settings: Mapping[str, Any]) -> None:
    """Refuse an instance whose runs could not outlive a prediction's deadline."""
    monitoring = instance_settings.get("run_monitoring") or {}
    if not monitoring.get("enabled"):
        raise ConfigError(
            "run_monitoring must be enabled: it fails crashed runs so that their credits are "
            "refunded"
        )
    runtime = float(monitoring.get("max_runtime_seconds") or 0)
    needed = settings.prediction_deadline_s() + FINISH_ALLOWANCE_S
    if runtime and runtime < needed:
        raise ConfigError(
            f"run_monitoring.max_runtime_seconds is {runtime:.0f}, but a run must outlive a "
            f"prediction's deadline: AI_HANDLER_PREDICTION_DEADLINE_S "
            f"({settings.prediction_deadline_s():.0f}) + {FINISH_ALLOWANCE_S:.0f} = "
            f"{needed:.0f} s at least; raise it or lower the deadline"
        )
