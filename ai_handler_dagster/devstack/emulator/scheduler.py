"""One thread that fires callbacks at given times.

Hundreds of predictions run at once, so none of them may own a sleeping thread: each run is a
few entries in this heap (progress ticks, completion, output expiry, webhook retries). Callbacks
run on the scheduler thread and must be quick; heavy work (rendering) is handed to a pool.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class ScheduledCall:
    """A pending callback; ``cancel()`` makes it a no-op if it has not fired yet."""

    __slots__ = ("callback", "canceled", "when")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.canceled = False

    def cancel(self) -> None:
        """Prevent the callback from running (harmless if it already ran)."""
        self.canceled = True


class Scheduler:
    """A min-heap of ``(monotonic time, callback)`` served by one daemon thread."""

    def __init__(self, name: str = "emulator-scheduler") -> None:
        self._heap: list[tuple[float, int, ScheduledCall]] = []
        self._counter = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> ScheduledCall:
        """Run ``callback`` on the scheduler thread after ``delay_s`` seconds."""
        call = ScheduledCall(time.monotonic() + max(0.0, delay_s), callback)
        with self._cond:
            heapq.heappush(self._heap, (call.when, next(self._counter), call))
            # Wake the thread only when the new entry is the earliest; otherwise its current
            # wait already ends in time.
            if self._heap[0][2] is call:
                self._cond.notify()
        return call

    def pending(self) -> int:
        """Number of entries still in the heap (canceled ones included until they pop)."""
        with self._cond:
            return len(self._heap)

    def stop(self) -> None:
        """Stop the thread; pending callbacks are dropped."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped:
                    if not self._heap:
                        self._cond.wait()
                        continue
                    wait = self._heap[0][0] - time.monotonic()
                    if wait <= 0:
                        break
                    self._cond.wait(wait)
                if self._stopped:
                    return
                _, _, call = heapq.heappop(self._heap)
            if call.canceled:
                continue
            try:
                call.callback()
            except Exception:  # a bad callback must not kill every other prediction's timers
                log.exception("emulator scheduled callback failed")
