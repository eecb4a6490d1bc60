"""The project's one retry policy (``retries.py``): Retry-After wins (capped, a small jitter),
else exponential backoff with jitter within its bounds; only retryable errors are retried, the
last error is raised as it is; polling gives up at its deadline."""

from __future__ import annotations

import time
from typing import Any

import pytest
import tenacity

from ai_handler_dagster import errors, retries
from ai_handler_dagster.errors import GenerationError
from ai_handler_dagster.replicate.failures import ProviderHTTPError


def _throttled(retry_after_s: float | None = None) -> GenerationError:
    return GenerationError(errors.RATE_LIMITED, "slow down", True, retry_after_s=retry_after_s)


def _wait_after(attempt: int, error: BaseException, base_s: float = 0.1) -> float:
    """The policy's wait after failed try number ``attempt`` raised ``error``."""
    state = tenacity.RetryCallState(retry_object=tenacity.Retrying(), fn=None, args=(), kwargs={})
    state.attempt_number = attempt
    state.set_exception((type(error), error, None))
    return retries.wait_backoff(base_s)(state)


class _Flaky:
    """Raises ``errors`` one by one, then returns ``"done"``; counts its calls."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "done"


def _recording(policy: tenacity.Retrying) -> tuple[tenacity.Retrying, list[float]]:
    sleeps: list[float] = []
    return policy.copy(sleep=sleeps.append), sleeps


def test_backoff_honours_retry_after_and_grows() -> None:
    assert 2.0 <= retries.backoff_s(1, base_s=0.1, retry_after_s=2.0) <= 2.5
    assert 0.05 <= retries.backoff_s(1, base_s=0.1) <= 0.1
    assert 0.4 <= retries.backoff_s(4, base_s=0.1) <= 0.8
    assert retries.backoff_s(50, base_s=0.1) <= retries.MAX_SLEEP_S


def test_retry_after_wins_with_a_small_jitter_and_is_capped() -> None:
    # Whatever the attempt number: the provider said how long.
    for attempt in (1, 3, 8):
        assert 7.0 <= _wait_after(attempt, _throttled(7.0)) <= 7.0 + 0.1 + 0.7
    assert _wait_after(1, _throttled(0.0)) <= 0.1
    assert _wait_after(1, _throttled(600.0)) == retries.MAX_SLEEP_S
    # The provider's own error type carries it too.
    assert 3.0 <= _wait_after(1, ProviderHTTPError(status=429, retry_after_s=3.0)) <= 3.4


def test_without_retry_after_the_wait_doubles_with_jitter_within_bounds() -> None:
    for attempt in range(1, 8):
        ceiling = 0.1 * 2 ** (attempt - 1)
        waits = {_wait_after(attempt, _throttled()) for _ in range(50)}
        assert all(ceiling / 2 <= w <= ceiling for w in waits), (attempt, waits)
        assert len(waits) > 1  # jittered, not one fixed value
    assert all(_wait_after(20, ValueError("x")) <= retries.MAX_SLEEP_S for _ in range(20))
    assert _wait_after(20, ValueError("x")) >= retries.MAX_SLEEP_S / 2


def test_a_non_retryable_error_stops_at_once() -> None:
    refused = GenerationError(errors.INVALID_INPUT, "no")
    flaky = _Flaky(refused)
    policy, sleeps = _recording(retries.retrying(attempts=5, base_s=0.1))
    with pytest.raises(GenerationError) as info:
        policy(flaky)
    assert info.value is refused and flaky.calls == 1 and sleeps == []
    # Not a GenerationError at all: not ours to retry either.
    other = _Flaky(KeyError("bug"))
    with pytest.raises(KeyError):
        _recording(retries.retrying(attempts=5, base_s=0.1))[0](other)
    assert other.calls == 1


def test_retryable_errors_are_retried_until_the_last_attempt_raises_as_it_is() -> None:
    last = _throttled()
    flaky = _Flaky(_throttled(), _throttled(), last, _throttled())
    policy, sleeps = _recording(retries.retrying(attempts=3, base_s=0.1))
    with pytest.raises(GenerationError) as info:
        policy(flaky)
    assert info.value is last  # not wrapped in tenacity's RetryError
    assert flaky.calls == 3 and len(sleeps) == 2
    assert 0.05 <= sleeps[0] <= 0.1 and 0.1 <= sleeps[1] <= 0.2


def test_a_throttled_try_waits_its_retry_after_then_succeeds() -> None:
    flaky = _Flaky(_throttled(2.0))
    policy, sleeps = _recording(retries.retrying(attempts=3, base_s=0.1))
    assert policy(flaky) == "done"
    assert flaky.calls == 2 and len(sleeps) == 1 and 2.0 <= sleeps[0] <= 2.3


def test_retry_on_exception_types_and_predicates() -> None:
    flaky = _Flaky(ConnectionError("reset"), ConnectionError("reset"))
    policy, _ = _recording(retries.retrying(attempts=3, base_s=0.1, retry_on=ConnectionError))
    assert policy(flaky) == "done" and flaky.calls == 3

    def transient(exc: BaseException) -> bool:
        return isinstance(exc, OSError) and "again" in str(exc)

    flaky = _Flaky(OSError("try again"), OSError("disk on fire"))
    policy, _ = _recording(retries.retrying(attempts=5, base_s=0.1, retry_on=transient))
    with pytest.raises(OSError, match="on fire"):
        policy(flaky)
    assert flaky.calls == 2


def test_polling_tries_at_its_interval_until_its_deadline() -> None:
    started = time.monotonic()
    ready_after = _Flaky(OSError("not yet"), OSError("not yet"))
    assert retries.polling(timeout_s=5, interval_s=0.01, retry_on=OSError)(ready_after) == "done"
    assert ready_after.calls == 3

    never: Any = _Flaky(*[OSError(f"not yet {i}") for i in range(1000)])
    with pytest.raises(OSError, match="not yet"):
        retries.polling(timeout_s=0.3, interval_s=0.05, retry_on=OSError)(never)
    assert 0.3 <= time.monotonic() - started < 5
    assert 4 <= never.calls <= 10
