"""The batcher answers every request it was given, alone or in a batch, even when its batch
fails: what the API's admitter and submitter stand on."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from ai_handler_dagster.api.batching import Batcher


def test_what_queues_while_a_batch_runs_is_the_next_batch() -> None:
    release = threading.Event()
    seen: list[list[int]] = []

    def run(items: Sequence[int]) -> list[int]:
        seen.append(list(items))
        release.wait(10)
        return [item * 2 for item in items]

    batcher: Batcher[int, int] = Batcher(run, name="test")

    async def main() -> list[int]:
        first = asyncio.ensure_future(batcher(1))
        while not seen:  # the first batch is running, with only the first item
            await asyncio.sleep(0.01)
        rest = [asyncio.ensure_future(batcher(i)) for i in (2, 3, 4)]
        await asyncio.sleep(0.05)
        release.set()
        return list(await asyncio.gather(first, *rest))

    assert asyncio.run(main()) == [2, 4, 6, 8]
    assert seen == [[1], [2, 3, 4]]
    batcher.close()


def test_a_failed_batch_fails_each_request_with_its_own_error() -> None:
    # Regression: one exception object was raised in every request of the batch, gathering
    # all their tracebacks; a run answering the wrong number of items would have killed the
    # thread and left every later request waiting forever.
    release = threading.Event()
    calls: list[list[int]] = []

    def run(items: Sequence[int]) -> list[int]:
        calls.append(list(items))
        if len(calls) == 1:
            release.wait(10)
        elif len(calls) == 2:
            raise ValueError("the database went away")
        elif len(calls) == 3:
            return []  # the wrong number of answers
        return list(items)

    batcher: Batcher[int, int] = Batcher(run, name="test")

    async def main() -> list[BaseException | int]:
        first = asyncio.ensure_future(batcher(1))
        while not calls:
            await asyncio.sleep(0.01)
        failing = [asyncio.ensure_future(batcher(i)) for i in (2, 3)]
        await asyncio.sleep(0.05)
        release.set()
        answers = await asyncio.gather(first, *failing, return_exceptions=True)
        short = await asyncio.gather(batcher(4), return_exceptions=True)
        return [*answers, *short, await batcher(5)]

    one, second, third, short, later = asyncio.run(main())
    assert calls[:2] == [[1], [2, 3]]
    assert one == 1
    assert isinstance(second, RuntimeError) and isinstance(second.__cause__, ValueError)
    assert isinstance(third, RuntimeError) and second is not third
    assert isinstance(short, RuntimeError) and "0 answers for 1" in str(short.__cause__)
    assert later == 5  # the thread survived both
    batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(batcher(6))
