"""Batches of a worker's concurrent requests: submits share a transaction, key checks a
statement.

A submit's cost is mostly fixed: a connection, the account lock, the write, the commit; a key
check's too. So the routes do not run their own statements; they hand their request to one of
the worker's ``Batcher`` threads, which takes every request queued while its previous batch ran
and answers them all: the submitter with ``generations.submissions`` (on PostgreSQL three or
four statements however many there are) in one transaction, the admitter with
``ratelimit.admit_many`` (one statement). No request waits for a batch to fill: an idle
worker's batch is the one request that came, and under load a batch is what arrived during the
last one. Awaiting a batcher costs the event loop no thread hop.

Each request is answered as if it had been alone, one after another: a refusal is that
request's, never its neighbours'. If a submit batch fails before its commit (a deadlock, a lost
connection) each request is submitted again alone, in its own transaction, so one request's
failure cannot fail the others; if the commit itself fails, whether it happened is unknown, so
every request of the batch gets the error and nothing is retried.

Written here rather than taken from a library: a batch is one database transaction, which is
this project's to define, and the queue is a thread and a ``queue.SimpleQueue``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import sqlalchemy as sa
from sqlalchemy.orm import Session

from ai_handler_dagster import generations as gens

log = logging.getLogger(__name__)

#: The most requests one transaction takes; what queues beyond it goes in the next batch.
MAX_BATCH = 64
#: How long a submit batch waits for a row lock before it fails (and each request is
#: submitted alone, each waiting as long again).
LOCK_TIMEOUT_MS = 5000


@dataclass(frozen=True)
class Submitted:
    """A request's generation: its id and status, and whether this request created it (False:
    a repeat of an earlier request, answered with its row)."""

    id: int
    status: str
    created: bool


#: What a batch answers each request: its generation, or the exception to raise for it.
Answer = Submitted | BaseException
#: Submits a batch in the session's transaction (committed by the caller), answering each.
BatchFn = Callable[[Session, Sequence[gens.SubmitRequest]], list[Answer]]

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Waiting(Generic[T, R]):
    item: T
    future: asyncio.Future[R | BaseException]
    loop: asyncio.AbstractEventLoop


class Batcher(Generic[T, R]):
    """One thread that runs ``run`` on what the event loop queued meanwhile, answering each
    item with its result or raising its exception; ``await batcher(item)`` from the loop."""

    def __init__(
        self,
        run: Callable[[Sequence[T]], Sequence[R | BaseException]],
        *,
        name: str,
        max_batch: int = MAX_BATCH,
    ) -> None:
        self._run = run
        self._name = name
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[_Waiting[T, R] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    async def __call__(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R | BaseException] = loop.create_future()
        with self._lock:  # queued before any stop marker close() puts after it
            self._start()
            self._queue.put(_Waiting(item, future, loop))
        answer = await future
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def close(self, timeout_s: float = 30.0) -> None:
        """Answer what is queued, then stop the thread."""
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout_s)

    def _start(self) -> None:
        if self._closed:
            raise RuntimeError(f"the {self._name} is closed")
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._serve, name=f"ai-handler-{self._name}", daemon=True
            )
            self._thread.start()

    def _serve(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self._max_batch:
                try:
                    waiting = self._queue.get_nowait()
                except queue.Empty:
                    break
                if waiting is None:
                    stopping = True
                    break
                batch.append(waiting)
            answers: Sequence[R | BaseException]
            try:
                answers = self._run([w.item for w in batch])
                if len(answers) != len(batch):
                    raise RuntimeError(f"{len(answers)} answers for {len(batch)} requests")
            except BaseException as exc:  # never lose the thread: every item gets the error
                log.exception("a batch of %d in the %s failed", len(batch), self._name)
                answers = [_failed(exc) for _ in batch]
            by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Any, Any]]] = {}
            for waiting, answer in zip(batch, answers, strict=True):
                by_loop.setdefault(waiting.loop, []).append((waiting.future, answer))
            for loop, settled in by_loop.items():
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                    loop.call_soon_threadsafe(_resolve, settled)


def _failed(cause: BaseException) -> BaseException:
    """The error one request of a failed batch raises: its own (an exception raised in several
    requests would gather all their tracebacks), caused by the batch's."""
    error = RuntimeError(f"the batch this request was in failed: {cause!r}")
    error.__cause__ = cause
    return error


def _resolve(settled: Sequence[tuple[asyncio.Future[Any], Any]]) -> None:
    for future, answer in settled:
        if not future.done():  # a request given up on (its client left) is not answered
            future.set_result(answer)


def submitter(engine: sa.Engine, run_batch: BatchFn) -> Batcher[gens.SubmitRequest, Submitted]:
    """A worker's submitter: batches of ``run_batch`` in one transaction each; a batch that
    fails before its commit is run again one request at a time."""

    def answer(requests: Sequence[gens.SubmitRequest]) -> list[Answer]:
        session = Session(engine, expire_on_commit=False)
        try:
            try:
                if engine.dialect.name == "postgresql":
                    # One account another transaction keeps locked must not stall every
                    # submit of the worker for longer: past this the batch fails, and each
                    # request is submitted alone.
                    session.execute(sa.text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT_MS}ms'"))
                answers = run_batch(session, requests)
            except sa.exc.DBAPIError:
                session.rollback()
                if len(requests) == 1:
                    raise
                # Nothing was committed: each request again, alone, so the one whose failure
                # it was cannot fail its neighbours.
                log.warning("a batch of %d submits failed; submitting each alone", len(requests))
                return [alone(request) for request in requests]
            session.commit()
            return answers
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def alone(request: gens.SubmitRequest) -> Answer:
        try:
            return answer([request])[0]
        except Exception as exc:
            return exc

    return Batcher(answer, name="submitter")
