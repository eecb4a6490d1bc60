"""Per-minute request budgets, reported in ``ratelimit-*`` headers and optionally enforced."""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Budget:
    """The outcome of taking one request from a bucket."""

    allowed: bool
    remaining: int
    reset_s: int
    """Seconds until the bucket is full again (the ``ratelimit-reset`` header)."""
    retry_after_s: int
    """Seconds until one more request fits (the ``Retry-After`` of a 429)."""


class TokenBucket:
    """A token bucket refilled at ``per_minute / 60`` tokens a second, holding ``burst`` tokens
    (default: a minute's worth).

    A bucket rather than fixed windows: Replicate lets short bursts through and throttles
    sustained excess, and so does a bucket. Accounts with little credit get a small limit and
    almost no burst (a few creates a minute, one at a time): ``burst=1`` is that. Both values
    are passed on every call, so a reconfigured emulator applies them at once.
    """

    def __init__(self, per_minute: int, burst: int | None = None) -> None:
        self._lock = threading.Lock()
        self._tokens = float(_capacity(per_minute, burst))
        self._last = time.monotonic()

    def take(self, per_minute: int, *, enforce: bool, burst: int | None = None) -> Budget:
        """Spend one token. Unenforced buckets never refuse; they only report."""
        return self._update(per_minute, burst, spend=True, enforce=enforce)

    def peek(self, per_minute: int, *, burst: int | None = None) -> Budget:
        """The budget as it stands, spending nothing (for answers outside the API)."""
        return self._update(per_minute, burst, spend=False, enforce=False)

    def _update(self, per_minute: int, burst: int | None, *, spend: bool, enforce: bool) -> Budget:
        with self._lock:
            now = time.monotonic()
            per_minute = max(1, per_minute)
            capacity = float(_capacity(per_minute, burst))
            rate = per_minute / 60.0
            self._tokens = min(capacity, self._tokens + (now - self._last) * rate)
            self._last = now
            allowed = self._tokens >= 1.0 or not enforce
            if spend and self._tokens >= 1.0:
                self._tokens -= 1.0
            retry_after = 0 if self._tokens >= 1.0 else math.ceil((1.0 - self._tokens) / rate)
            reset = math.ceil((capacity - self._tokens) / rate)
            return Budget(allowed, int(self._tokens), reset, max(1, retry_after))


def _capacity(per_minute: int, burst: int | None) -> int:
    return max(1, per_minute) if burst is None else max(1, burst)
