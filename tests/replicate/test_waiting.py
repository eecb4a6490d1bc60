"""Waiting for predictions: ``wait_many`` over many predictions with failures marked, one
unreadable prediction failing alone, a stuck prediction canceled at its deadline, webhook lookups,
few threads for hundreds of predictions, and the list sweep instead of one GET each.

Over real HTTP against the Replicate emulator started in-process.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

import pytest

from ai_handler_dagster import errors
from ai_handler_dagster.devstack.emulator import Faults
from ai_handler_dagster.errors import GenerationError
from ai_handler_dagster.replicate.client import ReplicateClient, ReplicateSettings
from ai_handler_dagster.replicate.snapshot import PredictionSnapshot, snapshot_error
from ai_handler_dagster.replicate.waiting import ListSweep, wait, wait_many
from tests.support.replicate import IMAGE, SMALL, MakeClient, emulated_by_id, requests_to


def test_wait_many_returns_all_and_marks_failures(emulator: Any, make_client: MakeClient) -> None:
    client = make_client(poll_workers=4)
    failing = set()
    ids = []
    for i in range(20):
        prompt = f"picture {i}" + (" [fail]" if i % 5 == 0 else "")
        snapshot = client.create(IMAGE, {"prompt": prompt, "seed": i, **SMALL})
        ids.append(snapshot.id)
        if "[fail]" in prompt:
            failing.add(snapshot.id)

    seen: list[PredictionSnapshot] = []
    max_poll_threads = 0
    for snapshot in wait_many(client, ids, deadline_s=30):
        seen.append(snapshot)
        polls = [t for t in threading.enumerate() if t.name.startswith("replicate-poll")]
        max_poll_threads = max(max_poll_threads, len(polls))
    assert sorted(s.id for s in seen) == sorted(ids)  # each exactly once
    for snapshot in seen:
        err = snapshot_error(snapshot)
        if snapshot.id in failing:
            assert snapshot.status == "failed"
            assert err is not None and err.code == errors.PREDICTION_FAILED
        else:
            assert snapshot.status == "succeeded" and err is None
    assert max_poll_threads <= 4


@pytest.mark.parametrize("garbled", [None, "html", "no-id", "deep"])
def test_one_unreadable_prediction_fails_alone(
    emulator: Any, make_client: MakeClient, garbled: str | None
) -> None:
    """Regression: one prediction the provider could not answer for (an unknown id, a 200 that
    is a proxy's HTML page, JSON without id and status, an output nested deeply enough to raise
    RecursionError) aborted the whole wait before yielding anything, so the op failed and the
    failure hook refunded and canceled the batch, its succeeded and paid predictions too."""
    client = make_client()
    good = [client.create(IMAGE, {"prompt": f"good {i}", **SMALL}).id for i in range(3)]
    if garbled is None:
        bad = "unknown0prediction0id"
    else:
        bad = client.create(IMAGE, {"prompt": "answered badly", **SMALL}).id
        emulator.configure(garbled={bad: garbled})
    done = {s.id: s for s in wait_many(client, [*good, bad], deadline_s=30)}
    assert set(done) == {*good, bad}
    assert all(done[p].status == "succeeded" and snapshot_error(done[p]) is None for p in good)
    err = snapshot_error(done[bad])
    assert done[bad].status == "failed" and err is not None
    assert err.code == errors.INTERNAL_ERROR and not err.retryable


def test_an_account_error_still_ends_the_whole_wait(emulator: Any, make_client: MakeClient) -> None:
    client = make_client()
    ids = [client.create(IMAGE, {"prompt": f"p{i}", **SMALL}).id for i in range(2)]
    stranger = make_client(api_token="r8_not_the_token")
    with pytest.raises(GenerationError) as info:
        list(wait_many(stranger, ids, deadline_s=10))
    assert info.value.code == errors.UNAUTHORIZED


def test_wait_many_survives_http_500s(emulator: Any, make_client: MakeClient) -> None:
    client = make_client()
    ids = [client.create(IMAGE, {"prompt": f"p{i}", **SMALL}).id for i in range(5)]
    emulator.configure(faults=Faults(http_500_rate=0.4, seed=7))
    done = list(wait_many(client, ids, deadline_s=20))
    assert sorted(s.id for s in done) == sorted(ids)
    assert all(s.status == "succeeded" for s in done)
    assert emulator.stats()["http_500"] >= 1


def test_stuck_prediction_is_canceled_at_deadline(emulator: Any, make_client: MakeClient) -> None:
    client = make_client()
    stuck = client.create(IMAGE, {"prompt": "never ends [stuck]", **SMALL})
    fine = client.create(IMAGE, {"prompt": "ends", **SMALL})
    started = time.monotonic()
    done = {s.id: s for s in wait_many(client, [stuck.id, fine.id], deadline_s=1.5)}
    assert time.monotonic() - started < 5
    assert done[fine.id].status == "succeeded" and not done[fine.id].deadline_exceeded
    late = done[stuck.id]
    assert late.status == "canceled" and late.deadline_exceeded
    assert snapshot_error(late).code == errors.DEADLINE_EXCEEDED  # type: ignore[union-attr]
    on_server = emulated_by_id(emulator)[stuck.id]
    assert on_server["status"] == "canceled" and on_server["_emulator"]["canceled_by"] == "api"


def test_a_retried_wait_keeps_the_deadline_of_the_first_create(
    emulator: Any, make_client: MakeClient
) -> None:
    """Regression (traced): each retry of the await step restarted the deadline, so a stuck
    prediction could run for as many deadlines as the step had tries."""
    client = make_client()
    stuck = client.create(IMAGE, {"prompt": "stuck since long ago [stuck]", **SMALL})
    started = time.monotonic()
    # Its attempt first created it an hour ago, with a 30-minute deadline: it is already late.
    [late] = wait_many(
        client, [stuck.id], deadline_s=1800, deadlines={stuck.id: time.time() - 1800}
    )
    assert time.monotonic() - started < 5
    assert late.status == "canceled" and late.deadline_exceeded


def test_a_prediction_the_provider_canceled_past_its_deadline_exceeded_it(
    emulator: Any, make_client: MakeClient
) -> None:
    """Regression (seen in the chaos soak, seed 2): the provider's own Cancel-After stopped a
    stuck prediction while its run was down; the retried wait then reported it as
    ``prediction_canceled`` (canceled by someone else) instead of ``deadline_exceeded``."""
    client = make_client(cancel_after_s=1)
    stuck = client.create(IMAGE, {"prompt": "left alone [stuck]", **SMALL})
    time.sleep(1.5)  # the provider cancels it meanwhile; its webhook records that
    recorded = client.get(stuck.id)
    assert recorded.status == "canceled"
    [late] = wait_many(
        client,
        [stuck.id],
        deadlines={stuck.id: time.time() - 1},
        lookup={stuck.id: recorded}.get,
        expect_webhooks=True,
    )
    assert late.status == "canceled" and late.deadline_exceeded
    assert snapshot_error(late).code == errors.DEADLINE_EXCEEDED  # type: ignore[union-attr]
    assert emulated_by_id(emulator)[stuck.id]["_emulator"]["canceled_by"] != "api"


def test_lookup_terminal_state_skips_polling(emulator: Any, make_client: MakeClient) -> None:
    """A state learned from a webhook (lookup) is used without any GET of that prediction."""
    client = make_client()
    first = client.create(IMAGE, {"prompt": "from webhook", **SMALL})
    known = dataclasses.replace(first, status="succeeded", output=["https://x.test/o.png"])
    before = requests_to(emulator, "GET /v1/predictions/")
    done = list(wait_many(client, [first.id], lookup=lambda _id: known))
    assert done == [known] and done[0] is known
    assert requests_to(emulator, "GET /v1/predictions/") == before

    # Nothing known yet: the lookup is asked, then the API is polled until the end.
    second = client.create(IMAGE, {"prompt": "polled", **SMALL})
    calls: list[str] = []

    def lookup(prediction_id: str) -> PredictionSnapshot | None:
        calls.append(prediction_id)
        return None

    assert wait(client, second.id, lookup=lookup).status == "succeeded"
    assert calls and set(calls) == {second.id}
    assert requests_to(emulator, "GET /v1/predictions/") > before


def test_expect_webhooks_polls_slowly(emulator: Any, make_client: MakeClient) -> None:
    """With a webhook expected and nothing in the lookup yet, polling is at poll_max_s."""
    client = make_client(poll_initial_s=0.02, poll_max_s=0.5)
    emulator.configure(latency_s=1.2)
    snapshot = client.create(IMAGE, {"prompt": "slow", **SMALL})
    before = requests_to(emulator, "GET /v1/predictions/")
    done = wait(client, snapshot.id, lookup=lambda _id: None, expect_webhooks=True)
    polls = requests_to(emulator, "GET /v1/predictions/") - before
    assert done.status == "succeeded"
    # Adaptive polling from 20 ms would make about 10 GETs in 1.2 s; slow polling at most ~4.
    assert polls <= 5


def test_wait_many_scales_without_threads(emulator: Any, make_client: MakeClient) -> None:
    """Two hundred predictions in flight are watched by at most poll_workers threads."""
    emulator.configure(concurrency=256, latency_s=0.5)
    client = make_client(poll_workers=6, poll_initial_s=0.1, poll_max_s=0.5)
    ids = [client.create(IMAGE, {"prompt": f"n{i}", **SMALL}).id for i in range(200)]
    seen = set()
    peak = 0
    for snapshot in wait_many(client, ids, deadline_s=60):
        assert snapshot.status == "succeeded" and snapshot.id not in seen
        seen.add(snapshot.id)
        # The emulator serves each connection on its own thread: count only ours.
        polls = [t for t in threading.enumerate() if t.name.startswith("replicate-poll")]
        peak = max(peak, len(polls))
    assert seen == set(ids)
    assert 1 <= peak <= 6
    # Adaptive polling: far fewer GETs than a fixed fast interval would need.
    assert requests_to(emulator, "GET /v1/predictions/") < 200 * 6


def test_lookup_result_wins_over_deadline(emulator: Any, make_client: MakeClient) -> None:
    """Past its deadline, a prediction a webhook already reported finished is not canceled."""
    client = make_client()
    running = client.create(IMAGE, {"prompt": "webhook said done [stuck]", **SMALL})
    reported = dataclasses.replace(running, status="succeeded")
    done = list(wait_many(client, [running.id], deadline_s=0.0, lookup=lambda _id: reported))
    assert done == [reported] and not done[0].deadline_exceeded
    assert requests_to(emulator, "/cancel") == 0
    client.cancel(running.id)  # clean up the stuck prediction


def test_list_sweep_finds_every_result_with_a_fraction_of_the_requests(
    emulator: Any, make_client: MakeClient
) -> None:
    """Many predictions queued behind the provider's cap: GET polling needs several requests per
    prediction, the sweep one list page per refresh, and the results are the same."""
    client = make_client()
    emulator.configure(latency_s=0.5, concurrency=4)
    ids = [client.create(IMAGE, {"prompt": f"sweep {i}", **SMALL}).id for i in range(40)]
    gets_before = requests_to(emulator, "GET /v1/predictions/")
    sweep = ListSweep(client, ids)
    done = {s.id: s for s in wait_many(client, ids, deadline_s=60, sweep=sweep)}
    assert set(done) == set(ids)
    assert all(s.status == "succeeded" and s.output and s.predict_time for s in done.values())
    gets = requests_to(emulator, "GET /v1/predictions/") - gets_before
    # Every answer came from the list: no GET of single predictions, and far fewer requests
    # than predictions (the queue took about 5 s to drain).
    assert gets == 0
    assert 1 <= sweep.requests < len(ids) / 2


def test_list_sweep_leaves_unseen_predictions_to_gets(
    emulator: Any, make_client: MakeClient
) -> None:
    """A sweep limited to one page of 2 cannot see older predictions: those are polled one by one,
    and every prediction still ends exactly once."""
    client = make_client()
    emulator.configure(page_size=2)
    ids = [client.create(IMAGE, {"prompt": f"deep {i}", **SMALL}).id for i in range(6)]
    sweep = ListSweep(client, ids, max_pages=1)
    done = [s.id for s in wait_many(client, ids, deadline_s=30, sweep=sweep)]
    assert sorted(done) == sorted(ids)
    # Only the two newest were on the one page the sweep reads.
    assert {p for p in ids if sweep.covers(p)} <= set(ids[-2:])
    assert requests_to(emulator, "GET /v1/predictions/") >= len(ids) - 2


def test_list_sweep_survives_an_unreadable_list(emulator: Any, make_client: MakeClient) -> None:
    client = make_client()
    ids = [client.create(IMAGE, {"prompt": f"flaky list {i}", **SMALL}).id for i in range(5)]
    emulator.configure(faults=Faults(http_500_rate=0.5, seed=3))
    done = list(wait_many(client, ids, deadline_s=30, sweep=ListSweep(client, ids)))
    assert sorted(s.id for s in done) == sorted(ids)
    assert all(s.status == "succeeded" for s in done)


def test_list_sweep_ignores_a_finished_entry_without_its_result() -> None:
    """A provider whose list shows finished predictions without output or metrics: the sweep
    does not take such an entry as the result (a GET reads the whole prediction)."""

    class FakeClient(ReplicateClient):
        def __init__(self) -> None:
            super().__init__(ReplicateSettings(base_url="https://api.example"))
            self.calls = 0

        def _request_json(
            self, method: str, path: str, *, attempts: int | None = None
        ) -> dict[str, Any]:
            self.calls += 1
            return {
                "results": [
                    {"id": "short", "status": "succeeded", "created_at": "2026-01-01T00:00:02Z"},
                    {
                        "id": "full",
                        "status": "succeeded",
                        "created_at": "2026-01-01T00:00:01Z",
                        "output": ["https://x/1.png"],
                        "metrics": {"predict_time": 1.0},
                    },
                ],
                "next": None,
            }

    fake = FakeClient()
    sweep = ListSweep(fake, ["short", "full"])
    assert sweep("short") is None and not sweep.covers("short")
    full = sweep("full")
    assert full is not None and full.output == ["https://x/1.png"] and sweep.covers("full")
    assert fake.calls == 1  # one refresh answered both lookups
