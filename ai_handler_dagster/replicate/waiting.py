"""Waiting for predictions without hammering the API.

:func:`wait_many` watches hundreds of predictions from one loop and a small thread pool, with
per-prediction adaptive polling, a shared pause on 429, optional webhook-fed state, and
cancellation at a deadline. Without webhooks, a :class:`ListSweep` answers for a page of
predictions per request of the provider's list instead of one GET each.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import heapq
import itertools
import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ai_handler_dagster import errors, retries
from ai_handler_dagster.domain import PredictionStatus
from ai_handler_dagster.errors import GenerationError
from ai_handler_dagster.replicate.client import ReplicateClient
from ai_handler_dagster.replicate.failures import _with_cause
from ai_handler_dagster.replicate.snapshot import PredictionSnapshot, parse_time

_log = logging.getLogger(__name__)


#: Longest wait between two looks at the webhook state of a prediction (a database read).
WEBHOOK_LOOKUP_MAX_S = 0.25


#: How often a watched prediction asks the list sweep for news (the sweep itself refreshes at
#: its own, slower pace).
SWEEP_LOOKUP_S = 0.25


class ListSweep:
    """Prediction states from listing recent predictions: one request answers for up to a page
    (100 on Replicate) of predictions, instead of one GET each.

    Without webhooks, hundreds of predictions polled one GET at a time cost several requests
    each (7 per generation measured with 384 in flight); the list costs a fraction of one. A
    refresh reads pages newest first until it has seen every pending prediction, or passes the
    oldest one's creation time (the provider's own clock, learned from the list), or reads
    ``max_pages``. Refreshes are at least ``min_interval_s`` apart, and ``per_page_s`` per page
    read last time (at most ``max_interval_s``): the bigger the list, the slower the sweep, so
    the request rate stays bounded.

    A prediction the last refresh did not see (beyond ``max_pages``, the list unreadable, or a
    finished entry without its output or metrics) is not ``covered``: ``wait_many`` polls it
    with GETs as usual. Used by one ``wait_many`` loop (not thread-safe).
    """

    def __init__(
        self,
        client: ReplicateClient,
        ids: Iterable[str],
        *,
        min_interval_s: float = 0.5,
        max_interval_s: float = 2.0,
        per_page_s: float = 0.25,
        max_pages: int = 20,
    ) -> None:
        self._client = client
        self._pending = set(ids)
        self._min_interval_s = min_interval_s
        self._max_interval_s = max_interval_s
        self._per_page_s = per_page_s
        self._max_pages = max_pages
        self._created: dict[str, float] = {}
        self._states: dict[str, PredictionSnapshot] = {}
        self._covered: frozenset[str] = frozenset()
        self._refreshed_at = float("-inf")
        self._interval = min_interval_s
        #: List requests made (for tests and metrics).
        self.requests = 0

    def __call__(self, prediction_id: str) -> PredictionSnapshot | None:
        """The state of ``prediction_id`` as of the latest refresh (refreshing first if due)."""
        if not self._terminal(prediction_id) and (
            time.monotonic() - self._refreshed_at >= self._interval
        ):
            self.refresh()
        return self._states.get(prediction_id)

    def covers(self, prediction_id: str) -> bool:
        """True if the latest refresh saw this prediction (no GET needed for it)."""
        return prediction_id in self._covered

    def refresh(self) -> None:
        pending = {p for p in self._pending if not self._terminal(p)}
        floor = (
            min(self._created[p] for p in pending)
            if pending and all(p in self._created for p in pending)
            else None
        )
        seen: set[str] = set()
        pages = 0
        try:
            for page in self._client.list_pages(self._max_pages if pending else 0, attempts=1):
                pages += 1
                self.requests += 1
                oldest = self._read_page(page, pending, seen)
                if seen >= pending:
                    break
                if floor is not None and oldest is not None and oldest < floor:
                    break  # newest first: everything further is older than what we wait for
        except GenerationError as err:
            # The list is unreadable for now: the predictions not seen yet are polled one by one
            # (their GETs handle throttling), and the sweep tries again at its next turn.
            _log.debug("prediction list unreadable: %s", err.message)
        self._covered = frozenset(seen)
        self._refreshed_at = time.monotonic()
        self._interval = min(
            self._max_interval_s, max(self._min_interval_s, self._per_page_s * pages)
        )

    def _terminal(self, prediction_id: str) -> bool:
        known = self._states.get(prediction_id)
        return known is not None and known.is_terminal

    def _read_page(
        self, page: Mapping[str, Any], pending: set[str], seen: set[str]
    ) -> float | None:
        oldest: float | None = None
        for item in page.get("results") or []:
            if not isinstance(item, dict):
                continue
            created = parse_time(item.get("created_at"))
            if created is not None:
                oldest = created if oldest is None else min(oldest, created)
            prediction_id = item.get("id")
            if not isinstance(prediction_id, str) or prediction_id not in pending:
                continue
            if created is not None:
                self._created[prediction_id] = created
            try:
                snapshot = PredictionSnapshot.from_json(item)
            except Exception:  # an entry we cannot read: a GET reads the whole prediction
                continue
            if snapshot.is_terminal and not {"output", "metrics"} <= item.keys():
                continue  # a summary without the result: a GET reads the whole prediction
            self._states[prediction_id] = snapshot
            seen.add(prediction_id)
        return oldest


@dataclass
class _Watch:
    """Polling state of one prediction inside :func:`wait_many`."""

    prediction_id: str
    deadline_at: float
    interval: float
    last_get_at: float = float("-inf")
    cancel_failures: int = 0


def wait(
    client: ReplicateClient,
    prediction_id: str,
    *,
    deadline_s: float | None = None,
    lookup: Callable[[str], PredictionSnapshot | None] | None = None,
    expect_webhooks: bool = False,
) -> PredictionSnapshot:
    """Wait for one prediction; see :func:`wait_many`."""
    return next(
        wait_many(
            client,
            [prediction_id],
            deadline_s=deadline_s,
            lookup=lookup,
            expect_webhooks=expect_webhooks,
        )
    )


def wait_many(
    client: ReplicateClient,
    ids: Iterable[str],
    *,
    deadline_s: float | None = None,
    lookup: Callable[[str], PredictionSnapshot | None] | None = None,
    expect_webhooks: bool = False,
    sweep: ListSweep | None = None,
    deadlines: Mapping[str, float] | None = None,
) -> Iterator[PredictionSnapshot]:
    """Yield each prediction of ``ids`` once, as soon as it is terminal (in finishing order).

    One loop schedules every prediction; at most ``poll_workers`` GETs run at once, so
    hundreds of predictions need no more threads. Each prediction is polled first after
    ``poll_initial_s``, then at intervals growing x1.5 up to ``poll_max_s`` (with jitter).
    A 429 pauses all polling for its ``Retry-After``; other transient errors just delay
    that prediction's next poll.

    ``lookup(id)`` may return the state learned from a webhook (e.g. read from the
    database): a terminal snapshot is yielded without any GET. When it has nothing terminal,
    the prediction is polled at ``poll_max_s`` if ``expect_webhooks`` (the webhook should
    come first; polling is the safety net) else at the adaptive interval; ``lookup`` itself
    is consulted at the adaptive interval.

    ``sweep`` (a :class:`ListSweep` over the same ids, for when no webhooks come) is asked
    next, every ``SWEEP_LOOKUP_S``; a prediction the sweep covers needs no GET at all.

    ``deadlines`` (epoch seconds by prediction id) sets a prediction's own deadline, counted
    from when its attempt first created it, so a retried wait does not start the clock
    again. A prediction still running past its deadline (else ``deadline_s``, default: the
    settings', after this call started) is canceled and yielded with status ``canceled``
    and ``deadline_exceeded=True``, unless the cancel shows it had already finished, in
    which case it is yielded as it is.

    A terminal error about one prediction (an unknown id, an answer that is not a
    prediction) ends only that one: it is yielded as ``failed`` with ``unreadable`` set, and
    the others are still waited for.

    Raises:
        GenerationError: an error about the whole account (unauthorized), or a prediction
            that could not be canceled at its deadline.
    """
    settings = client.settings
    backoff = settings.retry_backoff_s
    ordered = list(dict.fromkeys(ids))
    if not ordered:
        return
    start = time.monotonic()
    deadline_at = start + (settings.deadline_s if deadline_s is None else deadline_s)
    webhook_pending = lookup is not None and expect_webhooks
    # With webhooks expected the API is the safety net: the first GET waits a full fallback
    # interval, since the webhook normally lands first.
    wall_start = time.time()
    own = deadlines or {}
    watches = {
        pid: _Watch(
            pid,
            deadline_at=start + (own[pid] - wall_start) if pid in own else deadline_at,
            interval=settings.poll_initial_s,
            last_get_at=start if webhook_pending else float("-inf"),
        )
        for pid in ordered
    }
    seq = itertools.count()
    heap: list[tuple[float, int, str]] = []
    # The first look is immediate: a prediction may already be done (or known via lookup).
    for pid in ordered:
        heapq.heappush(heap, (start, next(seq), pid))
    paused_until = 0.0
    workers = min(settings.poll_workers, len(ordered))
    pool = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="replicate-poll")
    inflight: dict[cf.Future[PredictionSnapshot], tuple[str, str]] = {}

    def schedule(pid: str, delay: float) -> None:
        watch = watches[pid]
        due = min(time.monotonic() + delay, watch.deadline_at)
        heapq.heappush(heap, (due, next(seq), pid))

    def grow(watch: _Watch) -> float:
        delay = watch.interval * random.uniform(0.8, 1.2)
        watch.interval = min(settings.poll_max_s, watch.interval * 1.5)
        return delay

    try:
        while watches:
            now = time.monotonic()
            # Launch everything that is due, within the worker budget and outside a pause.
            while heap and heap[0][0] <= now and len(inflight) < workers and now >= paused_until:
                _, _, pid = heapq.heappop(heap)
                watch = watches[pid]
                # A finished state from the lookup wins even past the deadline: a webhook
                # already said how it ended, so there is nothing left to cancel.
                known = lookup(pid) if lookup is not None else None
                if (known is None or not known.is_terminal) and sweep is not None:
                    known = sweep(pid)
                if known is not None and known.is_terminal:
                    del watches[pid]
                    yield _past_deadline(known, watch)
                    now = time.monotonic()
                    continue
                if now >= watch.deadline_at:
                    inflight[pool.submit(_cancel_at_deadline, client, pid)] = (pid, "cancel")
                    continue
                if sweep is not None and sweep.covers(pid):
                    schedule(pid, SWEEP_LOOKUP_S)
                    continue
                # Waiting for a webhook: ask the lookup (the database) at least every
                # quarter second, the API only every webhook_fallback_s.
                if webhook_pending and now - watch.last_get_at < settings.webhook_fallback_s:
                    schedule(pid, min(grow(watch), WEBHOOK_LOOKUP_MAX_S))
                    continue
                watch.last_get_at = now
                inflight[pool.submit(client.get, pid, attempts=1)] = (pid, "get")

            if not watches:
                break
            # Sleep until a request finishes or the next prediction is due.
            wake_at = heap[0][0] if heap else now + settings.poll_max_s
            if len(inflight) >= workers and heap:
                wake_at = now + settings.poll_max_s  # only a finished request can free a worker
            wake_at = max(wake_at, paused_until)
            timeout = max(0.0, wake_at - time.monotonic())
            if inflight:
                done, _ = cf.wait(inflight, timeout=timeout, return_when=cf.FIRST_COMPLETED)
            else:
                time.sleep(timeout)
                done = set()

            for future in done:
                pid, kind = inflight.pop(future)
                watch = watches[pid]
                try:
                    snapshot = future.result()
                except Exception as exc:
                    err = _with_cause(client.classify(exc), exc)
                    if not err.retryable:
                        if err.code == errors.UNAUTHORIZED:
                            raise err from exc  # the account, not this prediction
                        del watches[pid]
                        yield PredictionSnapshot.unreadable_as(pid, err)
                        continue
                    if err.code == errors.RATE_LIMITED and err.retry_after_s is not None:
                        paused_until = max(paused_until, time.monotonic() + err.retry_after_s)
                    if kind == "cancel":
                        watch.cancel_failures += 1
                        if watch.cancel_failures >= settings.request_attempts:
                            raise GenerationError(
                                errors.PROVIDER_UNAVAILABLE,
                                f"prediction {pid} passed its deadline and could not be "
                                f"canceled: {err.message}",
                                retryable=True,
                            ) from err
                        schedule(pid, retries.backoff_s(watch.cancel_failures, base_s=backoff))
                    else:
                        pause = retries.backoff_s(
                            1, base_s=backoff, retry_after_s=err.retry_after_s
                        )
                        schedule(pid, max(grow(watch), pause))
                    continue
                if kind == "cancel" or snapshot.is_terminal:
                    del watches[pid]
                    yield _past_deadline(snapshot, watch)
                    continue
                # Without a lookup, polling is the only way to learn the result; with one, the
                # lookup keeps the adaptive pace and the GETs are throttled above.
                slow = expect_webhooks and lookup is None
                schedule(pid, settings.poll_max_s if slow else grow(watch))
    finally:
        # Leaving early (consumer stopped, error) must not wait for slow requests.
        pool.shutdown(wait=False, cancel_futures=True)


def _cancel_at_deadline(client: ReplicateClient, prediction_id: str) -> PredictionSnapshot:
    snapshot = client.cancel(prediction_id)
    if snapshot.status in (PredictionStatus.SUCCEEDED, PredictionStatus.FAILED):
        return snapshot  # it finished before our cancel landed: report what really happened
    return dataclasses.replace(snapshot, status=PredictionStatus.CANCELED, deadline_exceeded=True)


def _past_deadline(snapshot: PredictionSnapshot, watch: _Watch) -> PredictionSnapshot:
    """A prediction canceled once its deadline had passed was canceled for it, whoever did it:
    the provider's own ``Cancel-After`` stops one whose waiting run was gone at the time."""
    if (
        snapshot.status in (PredictionStatus.CANCELED, PredictionStatus.ABORTED)
        and not snapshot.deadline_exceeded
        and time.monotonic() >= watch.deadline_at
    ):
        return dataclasses.replace(snapshot, deadline_exceeded=True)
    return snapshot
