"""The project's one retry policy, defined once on tenacity.

Every retry loop of the project (requests to Replicate, output downloads, the embedded stack
starting up, the chaos soak) uses it:

- **wait**: the error's ``retry_after_s`` when it carries one (``GenerationError`` and
  ``ProviderHTTPError`` keep the provider's ``Retry-After``), plus a small jitter so that many
  throttled workers do not all come back in the same instant; else exponential backoff with
  jitter: after the n-th failed try, a random time between half and all of
  ``base_s * 2**(n-1)``. No sleep is ever longer than :data:`MAX_SLEEP_S`.
- **stop**: after ``attempts`` tries, the last error raised as it is (not wrapped).
- **retry**: only what says it may be retried, ``GenerationError.retryable`` by default; anything
  else is raised at once.

:func:`retrying` is that policy as a ``tenacity.Retrying``: call it with the function and its
arguments. :func:`backoff_s` is the same wait for loops that cannot hand their body to tenacity
(``ReplicateClient.create`` adopts between tries; ``wait_many`` schedules each prediction's next
poll in its own loop). :func:`polling` is for waiting until something is ready (a local server
starting): a fixed short interval until a deadline.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import tenacity

from ai_handler_dagster.errors import GenerationError

#: Upper bound of any single backoff sleep, whatever the attempt number or Retry-After says.
MAX_SLEEP_S = 60.0

#: What to retry: a predicate on the error, or exception types.
RetryOn = Callable[[BaseException], bool] | type[BaseException] | tuple[type[BaseException], ...]


def retryable(exc: BaseException) -> bool:
    """The default rule: retry an error that says a later try may succeed."""
    return isinstance(exc, GenerationError) and exc.retryable


def retry_after_of(exc: BaseException | None) -> float | None:
    """The seconds to wait that the error carries (``retry_after_s``), if any."""
    value = getattr(exc, "retry_after_s", None)
    return float(value) if isinstance(value, int | float) else None


def backoff_s(attempt: int, *, base_s: float, retry_after_s: float | None = None) -> float:
    """Seconds to sleep after failed try number ``attempt`` (1-based): ``retry_after_s`` when
    given (with a small jitter), else jittered doubling of ``base_s``; at most ``MAX_SLEEP_S``."""
    if retry_after_s is not None:
        # A small jitter keeps many throttled workers from retrying in the same instant.
        return min(MAX_SLEEP_S, retry_after_s + random.uniform(0, 0.1 + retry_after_s / 10))
    base = min(MAX_SLEEP_S, base_s * (2 ** (attempt - 1)))
    return random.uniform(base / 2, base)


class wait_backoff(tenacity.wait.wait_base):
    """The policy's wait as a tenacity wait strategy: :func:`backoff_s` of the failed try."""

    def __init__(self, base_s: float) -> None:
        self.base_s = base_s

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        outcome = retry_state.outcome
        error = outcome.exception() if outcome is not None and outcome.failed else None
        return backoff_s(
            retry_state.attempt_number, base_s=self.base_s, retry_after_s=retry_after_of(error)
        )


def _retry_on(rule: RetryOn) -> tenacity.retry_base:
    if isinstance(rule, type | tuple):
        return tenacity.retry_if_exception_type(rule)
    return tenacity.retry_if_exception(rule)


def retrying(*, attempts: int, base_s: float, retry_on: RetryOn = retryable) -> tenacity.Retrying:
    """The policy: at most ``attempts`` tries, retrying only ``retry_on`` errors, waiting
    :func:`backoff_s` (first backoff at most ``base_s``) between them. The last error is raised
    as it is. Use it as ``retrying(attempts=5, base_s=0.5)(fn, *args, **kwargs)``."""
    return tenacity.Retrying(
        stop=tenacity.stop_after_attempt(attempts),
        wait=wait_backoff(base_s),
        retry=_retry_on(retry_on),
        reraise=True,
    )


def polling(*, timeout_s: float, interval_s: float, retry_on: RetryOn) -> tenacity.Retrying:
    """Wait until a call succeeds: try every ``interval_s`` while ``retry_on`` errors come, and
    raise the last one once ``timeout_s`` has passed. For something that is starting (a local
    server), where backing off would only make the wait longer."""
    return tenacity.Retrying(
        stop=tenacity.stop_after_delay(timeout_s),
        wait=tenacity.wait_fixed(interval_s),
        retry=_retry_on(retry_on),
        reraise=True,
    )
