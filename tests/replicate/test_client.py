"""The Replicate client never pays twice.

Pure units (no network): model references, pagination cursors (backoff: ``tests/test_retries.py``).

Over real HTTP against the Replicate emulator started in-process: create by model and by
version, 422/404/401 mapping, 429 retried into exactly one prediction, a create whose response
was dropped adopted instead of duplicated, which listed predictions are a lost create's
candidates, cancel, Cancel-After, and the token absent from every error.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx
import pytest
import replicate

from ai_handler_dagster import errors
from ai_handler_dagster.devstack.emulator import Faults
from ai_handler_dagster.errors import GenerationError
from ai_handler_dagster.replicate import client as rc
from ai_handler_dagster.replicate.client import ReplicateClient, ReplicateSettings
from ai_handler_dagster.replicate.snapshot import PredictionSnapshot, snapshot_error
from ai_handler_dagster.replicate.waiting import wait, wait_many
from tests.support.replicate import (
    IMAGE,
    SMALL,
    MakeClient,
    emulated_by_id,
    lift_after_first,
    requests_to,
)


def test_a_malformed_model_reference_is_model_not_found() -> None:
    assert rc.checked_model_ref("demo/pixel-sketch:abc123").version == "abc123"
    with pytest.raises(GenerationError) as info:
        rc.checked_model_ref("not a model")
    assert info.value.code == errors.MODEL_NOT_FOUND


def test_cursor_never_leaves_base_origin() -> None:
    base = "http://127.0.0.1:5000"
    assert rc._cursor_path("http://127.0.0.1:5000/v1/predictions?cursor=a", base).startswith(base)
    assert rc._cursor_path("https://evil.test/v1/predictions?cursor=a", base) == (
        "/v1/predictions?cursor=a"
    )


def test_create_by_model_and_by_version(emulator: Any, make_client: MakeClient) -> None:
    client = make_client()
    by_model = client.create(IMAGE, {"prompt": "a red fox", "seed": 1, **SMALL})
    assert by_model.status in ("starting", "processing") and not by_model.is_terminal
    assert by_model.model == IMAGE and by_model.version

    by_version = client.create(
        f"{IMAGE}:{by_model.version}", {"prompt": "a blue fox", "seed": 2, **SMALL}
    )
    assert by_version.id != by_model.id and by_version.version == by_model.version

    done = {s.id: s for s in wait_many(client, [by_model.id, by_version.id], deadline_s=20)}
    assert {s.status for s in done.values()} == {"succeeded"}
    for snapshot in done.values():
        assert snapshot_error(snapshot) is None
        assert snapshot.output and snapshot.predict_time is not None and snapshot.web_url
        assert snapshot.raw["id"] == snapshot.id
    assert set(emulated_by_id(emulator)) == set(done)


def test_invalid_input_names_the_field(emulator: Any, make_client: MakeClient) -> None:
    with pytest.raises(GenerationError) as info:
        make_client().create(IMAGE, {"prompt": "too wide", "width": 5000, "height": 64})
    assert info.value.code == errors.INVALID_INPUT and not info.value.retryable
    assert "width" in info.value.message
    assert emulator.predictions() == []


def test_unknown_model_and_version(emulator: Any, make_client: MakeClient) -> None:
    client = make_client()
    with pytest.raises(GenerationError) as info:
        client.create("demo/no-such-model", {"prompt": "x"})
    assert info.value.code == errors.MODEL_NOT_FOUND and not info.value.retryable
    with pytest.raises(GenerationError) as info:
        client.create(f"{IMAGE}:{'0' * 64}", {"prompt": "x"})
    assert info.value.code == errors.MODEL_NOT_FOUND
    assert emulator.predictions() == []


def test_bad_token_is_unauthorized_and_never_shown(emulator: Any, make_client: MakeClient) -> None:
    secret = "r8_wrong_" + "x7Q" * 8
    client = make_client(api_token=secret)
    with pytest.raises(GenerationError) as info:
        client.create(IMAGE, {"prompt": "x", **SMALL})
    assert info.value.code == errors.UNAUTHORIZED
    with pytest.raises(GenerationError) as get_info:
        client.get("abc")
    assert get_info.value.code == errors.UNAUTHORIZED
    for err in (info.value, get_info.value):
        chain: BaseException | None = err
        seen: set[int] = set()
        while chain is not None and id(chain) not in seen:  # the cause chain Dagster serializes
            seen.add(id(chain))
            assert secret not in str(chain) and secret not in repr(chain)
            chain = chain.__cause__ or chain.__context__
        assert chain is None  # and it ends: no exception is its own cause
    assert secret not in repr(client)


def test_token_not_in_transport_errors() -> None:
    """Connection refused: retryable provider_unavailable, no token in the message."""
    secret = "r8_" + "s3cr3t" * 5
    client = ReplicateClient(
        ReplicateSettings(
            api_token=secret, base_url="http://127.0.0.1:9", create_attempts=2, retry_backoff_s=0.01
        )
    )
    with pytest.raises(GenerationError) as info:
        client.create(IMAGE, {"prompt": "x"})
    assert info.value.code == errors.PROVIDER_UNAVAILABLE and info.value.retryable
    assert secret not in str(info.value) and secret not in repr(info.value)


def test_429_on_create_is_retried_into_one_prediction(
    emulator: Any, make_client: MakeClient
) -> None:
    emulator.configure(faults=Faults(http_429_rate=1.0, retry_after_s=1))
    lifter = lift_after_first(emulator, "http_429")
    started = time.monotonic()
    snapshot = make_client().create(IMAGE, {"prompt": "throttled", **SMALL})
    lifter.join()
    assert time.monotonic() - started >= 1.0  # Retry-After was honoured
    stats = emulator.stats()
    assert stats["http_429"] >= 1 and stats["creates"] == 1
    assert list(emulated_by_id(emulator)) == [snapshot.id]


def test_500_on_create_never_creates_blindly(emulator: Any, make_client: MakeClient) -> None:
    """A 5xx may hide an accepted create: while the list cannot be read, nothing is created."""
    emulator.configure(faults=Faults(http_500_rate=1.0))
    client = make_client(create_attempts=3, request_attempts=2)
    request = {"prompt": "outage", **SMALL}
    with pytest.raises(GenerationError) as info:
        client.create(IMAGE, request, adopt=_first_candidate(client, request, time.time()))
    assert info.value.code == errors.PROVIDER_UNAVAILABLE and info.value.retryable
    assert "may have started a prediction" in info.value.message
    assert requests_to(emulator, "POST /v1/models") == 1
    assert requests_to(emulator, "GET /v1/predictions") >= 2  # looked before each retry
    assert emulator.predictions() == []


def test_500_on_create_then_recovery_creates_once(emulator: Any, make_client: MakeClient) -> None:
    emulator.configure(faults=Faults(http_500_rate=1.0))
    lifter = lift_after_first(emulator, "http_500")
    client = make_client(retry_backoff_s=0.2)
    request = {"prompt": "blip", **SMALL}
    snapshot = client.create(IMAGE, request, adopt=_first_candidate(client, request, time.time()))
    lifter.join()
    assert list(emulated_by_id(emulator)) == [snapshot.id]
    assert emulator.stats()["creates"] == 1


def _first_candidate(
    client: ReplicateClient, request: dict[str, Any], started_at: float
) -> Callable[[], PredictionSnapshot | None]:
    """An ``adopt`` callback taking the nearest candidate, owned by nobody (no database)."""

    def adopt() -> PredictionSnapshot | None:
        found = client.lost_create_candidates(
            IMAGE, request, started_at=started_at, model_names=None
        )
        return found[0] if found else None

    return adopt


def test_maybe_created_looks_before_creating(emulator: Any, make_client: MakeClient) -> None:
    """Regression: an op retry after a lost create must adopt, not create a second one."""
    client = make_client()
    request = {"prompt": "retried op", "seed": 9, **SMALL}
    started = time.time()
    emulator.configure(faults=Faults(drop_create_rate=1.0))
    # The earlier call died with its create's answer lost: made here with the bare client.
    bare = replicate.Client(api_token=emulator.token, base_url=emulator.base_url)
    with pytest.raises(httpx.RemoteProtocolError):
        bare.models.predictions.create(model=IMAGE, input=request)
    emulator.configure(faults=Faults())
    assert len(emulator.predictions()) == 1
    adopt = _first_candidate(client, request, started)
    adopted = client.create(IMAGE, request, adopt=adopt, maybe_created=True)
    assert list(emulated_by_id(emulator)) == [adopted.id]
    assert emulator.stats()["creates"] == 1


def test_dropped_create_is_adopted_not_duplicated(emulator: Any, make_client: MakeClient) -> None:
    """Regression: a create whose response is lost must not start a second paid prediction."""
    emulator.configure(faults=Faults(drop_create_rate=1.0))
    client = make_client()
    request = {"prompt": "dropped", "seed": 3, **SMALL}
    snapshot = client.create(IMAGE, request, adopt=_first_candidate(client, request, time.time()))
    stats = emulator.stats()
    assert stats["creates"] == 1 and stats["create_responses_dropped"] == 1
    emulated = emulated_by_id(emulator)
    assert list(emulated) == [snapshot.id]
    assert emulated[snapshot.id]["_emulator"]["response_dropped"] is True


def test_a_lost_answer_without_adopt_is_never_created_again(
    emulator: Any, make_client: MakeClient
) -> None:
    emulator.configure(faults=Faults(drop_create_rate=1.0))
    with pytest.raises(GenerationError, match="may have started a prediction"):
        make_client().create(IMAGE, {"prompt": "lost", **SMALL})
    assert emulator.stats()["creates"] == 1


def test_every_create_request_is_announced_before_it_is_sent(
    emulator: Any, make_client: MakeClient
) -> None:
    """The caller notes each try's answer as in flight (orphan sweeps must not take a
    prediction whose answer is on its way), including a retry after a 429."""
    emulator.configure(faults=Faults(http_429_rate=1.0, retry_after_s=1))
    calls: list[int] = []
    lifter = lift_after_first(emulator, "http_429")
    client = make_client()
    client.create(IMAGE, {"prompt": "announced", **SMALL}, before_try=lambda: calls.append(1))
    lifter.join()
    assert len(calls) == requests_to(emulator, "POST /v1/models") >= 2


def test_a_list_too_long_to_reach_the_create_is_not_taken_for_absence(
    emulator: Any, make_client: MakeClient
) -> None:
    """Regression (review): the list was read for at most a fixed number of pages and a lost
    create further down looked absent, so a second paid prediction was created."""
    emulator.configure(page_size=2)
    client = make_client()
    since = time.time() - 60
    for i in range(5):
        client.create(IMAGE, {"prompt": f"p{i}", **SMALL})
    assert len(client.recent_predictions(since, max_pages=1)) == 2  # partial is fine here
    with pytest.raises(GenerationError) as info:
        client.recent_predictions(since, max_pages=1, complete=True)
    assert info.value.retryable and "more than 1 pages" in info.value.message
    assert len(client.recent_predictions(since, max_pages=10, complete=True)) == 5


def test_odd_list_entries_are_nobodys_candidates() -> None:
    """One foreign entry of an odd shape in the account's list must not fail a batch."""

    class FakeClient(ReplicateClient):
        def recent_predictions(self, since: float, **kw: Any) -> list[dict]:
            deep: Any = []
            for _ in range(5000):
                deep = [deep]
            return [
                {"id": "p1", "status": "starting", "model": ["not", "a", "name"], "input": {}},
                {"id": "p2", "status": "failed", "model": IMAGE, "input": {}, "error": deep},
                {"id": "p3", "status": "starting", "model": IMAGE, "input": {}},
            ]

    fake = FakeClient(ReplicateSettings(api_token="r8_unused", base_url="http://127.0.0.1:9"))
    found = fake.lost_create_candidates(IMAGE, {}, started_at=time.time(), model_names={IMAGE})
    assert [c.id for c in found] == ["p3"]


def test_candidates_are_api_made_same_input_named_models_nearest_first(
    emulator: Any, make_client: MakeClient
) -> None:
    """Only what a lost create of this request could have made: not a website prediction, not
    another input, not another model name once names are known, not one from before the
    attempt; the one created nearest the attempt's first create comes first."""
    client = make_client(adopt_window_s=0.5)
    request = {"prompt": "the same", "seed": 1, **SMALL}
    old = client.create(IMAGE, request)
    time.sleep(1.0)
    started = time.time()
    near = client.create(IMAGE, request)
    time.sleep(0.2)
    far = client.create(IMAGE, request)
    web = emulator.web_prediction(IMAGE, request)
    other_input = client.create(IMAGE, {**request, "seed": 2})

    def ids(names: set[str] | None) -> list[str]:
        found = client.lost_create_candidates(IMAGE, request, started_at=started, model_names=names)
        return [c.id for c in found]

    assert ids(None) == [near.id, far.id]
    assert ids({IMAGE}) == [near.id, far.id]
    assert ids({"someone/else"}) == [near.id, far.id]  # the requested name always counts
    assert web["source"] == "web" and web["id"] not in ids(None)
    assert old.id not in ids(None) and other_input.id not in ids(None)


def test_an_aliased_official_model_is_matched_by_its_answered_name(
    emulator: Any, make_client: MakeClient
) -> None:
    emulator.configure(model_aliases={IMAGE: "demo/pixel-sketch-official"})
    client = make_client()
    request = {"prompt": "official", **SMALL}
    started = time.time()
    made = client.create(IMAGE, request)
    assert made.model == "demo/pixel-sketch-official"

    def found(names: set[str] | None) -> list[str]:
        candidates = client.lost_create_candidates(
            IMAGE, request, started_at=started, model_names=names
        )
        return [c.id for c in candidates]

    assert found(None) == [made.id]  # nothing learned yet: input and time alone
    assert found({"demo/pixel-sketch-official"}) == [made.id]
    assert found({"demo/something-else"}) == []


def test_a_create_can_send_its_own_cancel_after(emulator: Any, make_client: MakeClient) -> None:
    """A metered model's prediction is stopped by the provider soon after what can be charged,
    not at the client's long default."""
    client = make_client(cancel_after_s=1860)
    own = client.create(IMAGE, {"prompt": "short", **SMALL}, cancel_after_s=390)
    default = client.create(IMAGE, {"prompt": "default", **SMALL})
    emulated = emulated_by_id(emulator)
    assert emulated[own.id]["_emulator"]["deadline_s"] == 390
    assert emulated[default.id]["_emulator"]["deadline_s"] == 1860


def test_cancel_is_idempotent(emulator: Any, make_client: MakeClient) -> None:
    client = make_client()
    snapshot = client.create(IMAGE, {"prompt": "quick", **SMALL})
    finished = wait(client, snapshot.id, deadline_s=20)
    assert finished.status == "succeeded"
    assert client.cancel(snapshot.id).status == "succeeded"  # no error, nothing changed
    running = client.create(IMAGE, {"prompt": "stop me [stuck]", **SMALL})
    assert client.cancel(running.id).status == "canceled"
    assert client.cancel(running.id).status == "canceled"


def test_create_sends_cancel_after(emulator: Any, make_client: MakeClient) -> None:
    """The provider-side deadline (Cancel-After) is set on every create, unless disabled."""
    with_deadline = make_client(cancel_after_s=90).create(IMAGE, {"prompt": "a", **SMALL})
    without = make_client(cancel_after_s=None).create(IMAGE, {"prompt": "b", **SMALL})
    emulated = emulated_by_id(emulator)
    assert emulated[with_deadline.id]["_emulator"]["deadline_s"] == 90
    assert emulated[without.id]["_emulator"]["deadline_s"] is None


def test_concurrent_creates_from_many_threads(emulator: Any, make_client: MakeClient) -> None:
    """One shared client serves many threads: every create lands exactly once."""
    client = make_client()
    results: list[str] = []
    lock = threading.Lock()

    def work(worker: int) -> None:
        for i in range(3):
            snapshot = client.create(IMAGE, {"prompt": f"w{worker} i{i}", **SMALL})
            with lock:
                results.append(snapshot.id)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == len(set(results)) == 30
    assert set(emulated_by_id(emulator)) == set(results)


def test_under_the_throttle_a_429_spends_no_attempt(
    emulator: Any, make_client: MakeClient, sqlite_url: str
) -> None:
    """Regression: with the provider's limit reached, a create with one attempt failed its
    generation with ``rate_limited``; under the shared throttle it waits (the throttle, told
    by the 429, holds every create back for its Retry-After) and is made."""
    from ai_handler_dagster import db
    from ai_handler_dagster.db.engine import make_engine
    from ai_handler_dagster.throttle import CreateThrottle, Limits

    emulator.configure(rate_limit=True, creates_per_minute=60, creates_burst=1)
    client = make_client(create_attempts=1)
    client.create(IMAGE, {"prompt": "the burst", **SMALL})
    with pytest.raises(GenerationError) as raised:
        client.create(IMAGE, {"prompt": "no throttle", **SMALL})
    assert raised.value.code == errors.RATE_LIMITED

    db.upgrade(sqlite_url)
    # Configured above the provider's real limit: only the provider's answers slow it down.
    throttle = CreateThrottle(make_engine(sqlite_url), Limits(per_minute=600, burst=5))
    started = time.monotonic()
    snapshot = client.create(
        IMAGE, {"prompt": "throttled", **SMALL}, pacer=throttle.pacer(time.time() + 30)
    )
    assert time.monotonic() - started >= 0.9  # the Retry-After, for every create
    assert throttle.bucket().blocked_until is not None
    stats = emulator.stats()
    assert stats["rate_limited"] >= 2 and stats["creates"] == 2
    assert snapshot.id in emulated_by_id(emulator)


def test_a_pacer_hears_every_create_answer_with_its_headers(
    emulator: Any, make_client: MakeClient
) -> None:
    heard: list[tuple[int, dict[str, str]]] = []
    turns: list[float] = []

    class Recording:
        def wait_turn(self) -> None:
            turns.append(time.monotonic())

        def answered(self, status: int, headers: Mapping[str, str]) -> None:
            heard.append((status, dict(headers)))

    emulator.configure(faults=Faults(http_429_rate=1.0, retry_after_s=1))
    lifter = lift_after_first(emulator, "http_429")
    make_client(create_attempts=1).create(IMAGE, {"prompt": "heard", **SMALL}, pacer=Recording())
    lifter.join()
    statuses = [status for status, _ in heard]
    # Until the fault is lifted every try is a 429, none spending the only attempt.
    assert statuses[-1] == 201 and set(statuses[:-1]) == {429}
    assert heard[0][1]["retry-after"] == "1"
    assert all("ratelimit-remaining" in headers for _, headers in heard)
    assert len(turns) == len(heard)  # a turn before each create request
    # The client leaves the waiting to the pacer: no backoff of its own after a 429.
    assert turns[-1] - turns[0] < 0.9


def test_a_failing_look_after_a_429_counts_as_an_attempt(
    emulator: Any, make_client: MakeClient
) -> None:
    """Regression: after a 429 under a pacer, an ``adopt()`` that failed retryably (the list
    longer than the pages read since the create) looped at once, forever: no attempt counted,
    no backoff, and the pacer (its queue deadline, its stop) never asked again."""
    looks: list[float] = []

    def adopt() -> PredictionSnapshot | None:
        looks.append(time.monotonic())
        if len(looks) == 1:
            return None  # nothing found: the create is tried, and answered 429
        if len(looks) > 20:
            raise GenerationError(errors.INTERNAL_ERROR, "spinning")  # ends the old loop
        raise GenerationError(errors.PROVIDER_UNAVAILABLE, "list too long", retryable=True)

    class Turns:
        def wait_turn(self) -> None:
            pass

        def answered(self, status: int, headers: Mapping[str, str]) -> None:
            pass

        def unused(self) -> None:
            pass

    emulator.configure(faults=Faults(http_429_rate=1.0, retry_after_s=0))
    with pytest.raises(GenerationError) as raised:
        make_client(create_attempts=3).create(
            IMAGE, {"prompt": "spin", **SMALL}, adopt=adopt, maybe_created=True, pacer=Turns()
        )
    assert raised.value.code == errors.PROVIDER_UNAVAILABLE and raised.value.retryable
    # The first look, the 429, then three failing looks (each an attempt) and the last look.
    assert len(looks) == 5
    assert emulator.stats()["http_429"] == 1 and emulator.stats()["creates"] == 0
    assert looks[3] - looks[2] >= 0.04  # backed off between attempts (0.05 s at least)


def test_a_turn_not_used_is_handed_back(emulator: Any, make_client: MakeClient) -> None:
    """A turn granted to a create that is then not sent (noting it in flight failed) goes back
    to the pacer, so no other create waits behind it."""
    calls: list[str] = []

    class Turns:
        def wait_turn(self) -> None:
            calls.append("turn")

        def answered(self, status: int, headers: Mapping[str, str]) -> None:
            calls.append("answered")

        def unused(self) -> None:
            calls.append("unused")

    def before_try() -> None:
        raise RuntimeError("the database is gone")

    with pytest.raises(RuntimeError):
        make_client().create(IMAGE, {"prompt": "x", **SMALL}, before_try=before_try, pacer=Turns())
    assert calls == ["turn", "unused"]
    assert emulator.stats()["creates"] == 0


def test_the_queue_deadline_after_a_lost_answer_takes_the_last_look(
    emulator: Any, make_client: MakeClient, any_db_url: str
) -> None:
    """Regression: giving up at the queue deadline after a lost answer left ``create`` at once,
    without the last look every other error takes, so the lost create's prediction (shown by
    the list only now) ran on, paid, owned by nobody, while its generation was refunded."""
    from ai_handler_dagster import db
    from ai_handler_dagster.db.engine import make_engine
    from ai_handler_dagster.throttle import CreateThrottle, Limits

    db.upgrade(any_db_url)
    throttle = CreateThrottle(make_engine(any_db_url), Limits(per_minute=1, burst=1))
    throttle.wait_turn()  # the only token: the next turn is a minute away
    client = make_client()
    late = client.create(IMAGE, {"prompt": "lost", **SMALL})  # what the lost create made
    looks: list[int] = []

    def adopt() -> PredictionSnapshot | None:
        looks.append(1)
        return None if len(looks) == 1 else late  # the list shows it only at the last look

    found = client.create(
        IMAGE,
        {"prompt": "lost", **SMALL},
        adopt=adopt,
        maybe_created=True,
        pacer=throttle.pacer(time.time() + 1),
    )
    assert found.id == late.id and len(looks) == 2
    assert emulator.stats()["creates"] == 1  # nothing created at the deadline

    # Nothing found at the last look either: the deadline's error, saying what may be left.
    with pytest.raises(GenerationError) as raised:
        client.create(
            IMAGE,
            {"prompt": "lost", **SMALL},
            adopt=lambda: None,
            maybe_created=True,
            pacer=throttle.pacer(time.time() + 1),
        )
    assert raised.value.code == errors.DEADLINE_EXCEEDED and not raised.value.retryable
    assert "may have started a prediction" in raised.value.message
