"""The Replicate resource maps every failure to a stable error code and never pays twice.

Pure units (no network): error classification of client and httpx exceptions, Retry-After
parsing, model references, timestamps, snapshot errors, token scrubbing.

Over real HTTP against the Replicate emulator started in-process: create by model and by
version, 422/404/401 mapping, 429 retried into exactly one prediction, a create whose response
was dropped adopted instead of duplicated, ``wait_many`` over many predictions with failures
marked, a stuck prediction canceled at its deadline, and the token absent from every error.
"""

from __future__ import annotations

import dataclasses
import pickle
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import replicate
from replicate.exceptions import ReplicateError

from ai_handler_dagster import errors
from ai_handler_dagster.devstack.emulator import Faults
from ai_handler_dagster.errors import GenerationError
from ai_handler_dagster.resources import replicate as rr
from ai_handler_dagster.resources.replicate import (
    ListSweep,
    PredictionSnapshot,
    ProviderHTTPError,
    ReplicateResource,
    classify,
    parse_retry_after,
    snapshot_error,
)

# --------------------------------------------------------------------------------------------
# Pure units


def _snapshot(**overrides: Any) -> PredictionSnapshot:
    data: dict[str, Any] = {
        "id": "p1",
        "status": "succeeded",
        "model": "demo/pixel-sketch",
        "version": "v1",
        "output": ["https://example.test/out.png"],
        "metrics": {"predict_time": 1.25},
        "urls": {"web": "https://replicate.com/p/p1", "get": "x"},
        "created_at": "2025-01-01T00:00:00.123456789Z",
    }
    data.update(overrides)
    return PredictionSnapshot.from_json(data)


@pytest.mark.parametrize(
    ("status", "title", "code", "retryable"),
    [
        (401, "Unauthenticated", errors.UNAUTHORIZED, False),
        (403, "Forbidden", errors.UNAUTHORIZED, False),
        (404, "Not found", errors.MODEL_NOT_FOUND, False),
        (422, "Input validation failed", errors.INVALID_INPUT, False),
        (422, "Invalid version or not permitted", errors.MODEL_NOT_FOUND, False),
        (429, "Request was throttled", errors.RATE_LIMITED, True),
        (500, "Internal Server Error", errors.PROVIDER_UNAVAILABLE, True),
        (502, None, errors.PROVIDER_UNAVAILABLE, True),
        (503, None, errors.PROVIDER_UNAVAILABLE, True),
        (400, "Bad request", errors.INTERNAL_ERROR, False),
    ],
)
def test_classify_http_status(status: int, title: str | None, code: str, retryable: bool) -> None:
    err = classify(ReplicateError(status=status, title=title, detail="something"))
    assert (err.code, err.retryable) == (code, retryable)
    assert err.code in errors.ALL_CODES
    assert (err.code in errors.RETRYABLE_CODES) == retryable


def test_classify_keeps_invalid_fields_and_retry_after() -> None:
    invalid = ProviderHTTPError(
        status=422,
        title="Input validation failed",
        detail="- input.width: Must be less than or equal to 1024",
        invalid_fields=[{"type": "maximum", "field": "input.width", "description": "too big"}],
    )
    err = classify(invalid)
    assert err.code == errors.INVALID_INPUT
    assert "input.width" in err.message and "too big" in err.message

    throttled = classify(ProviderHTTPError(status=429, title="throttled", retry_after_s=7.0))
    assert throttled.retryable and throttled.retry_after_s == 7.0


@pytest.mark.parametrize(
    "exc",
    [
        httpx.ConnectError("refused"),
        httpx.ReadTimeout("slow"),
        httpx.RemoteProtocolError("Server disconnected without sending a response."),
        httpx.PoolTimeout("pool"),
    ],
)
def test_classify_transport_errors_are_retryable(exc: Exception) -> None:
    err = classify(exc)
    assert err.code == errors.PROVIDER_UNAVAILABLE and err.retryable


def test_classify_unknown_and_generation_errors() -> None:
    original = GenerationError(errors.INSUFFICIENT_CREDITS, "no money")
    assert classify(original) is original
    err = classify(ValueError("boom"))
    assert err.code == errors.INTERNAL_ERROR and not err.retryable and "boom" in err.message


def test_classify_scrubs_token_shapes() -> None:
    err = classify(ValueError("header was Authorization: Bearer r8_SECRETsecret123"))
    assert "r8_SECRET" not in err.message and "r8_SECRET" not in repr(err)
    assert "[redacted]" in err.message


def test_may_have_been_accepted() -> None:
    """Only a refusal or a failure before sending makes a blind create retry safe."""
    assert not rr._may_have_been_accepted(httpx.ConnectError("refused"))
    assert not rr._may_have_been_accepted(ProviderHTTPError(status=429))
    assert not rr._may_have_been_accepted(ProviderHTTPError(status=422))
    assert rr._may_have_been_accepted(ProviderHTTPError(status=500))
    assert rr._may_have_been_accepted(httpx.ReadTimeout("slow"))
    assert rr._may_have_been_accepted(httpx.RemoteProtocolError("dropped"))


def test_parse_retry_after() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0


def test_a_malformed_model_reference_is_model_not_found() -> None:
    assert rr.checked_model_ref("demo/pixel-sketch:abc123").version == "abc123"
    with pytest.raises(GenerationError) as info:
        rr.checked_model_ref("not a model")
    assert info.value.code == errors.MODEL_NOT_FOUND


def test_parse_time_accepts_nanoseconds() -> None:
    assert rr.parse_time("2025-01-01T00:00:00.123456789Z") == pytest.approx(1735689600.123456)
    assert rr.parse_time("2025-01-01T00:00:00+00:00") == 1735689600.0
    assert rr.parse_time("2025-01-01T00:00:00") is None  # no zone: cannot compare clocks
    assert rr.parse_time(None) is None


def test_snapshot_properties_and_errors() -> None:
    ok = _snapshot()
    assert ok.is_terminal and ok.predict_time == 1.25 and ok.web_url == "https://replicate.com/p/p1"
    assert ok.raw["created_at"].endswith("Z")
    assert snapshot_error(ok) is None
    assert snapshot_error(_snapshot(status="processing")) is None
    assert not _snapshot(status="starting").is_terminal

    failed = snapshot_error(_snapshot(status="failed", error="CUDA out of memory"))
    assert failed is not None and failed.code == errors.PREDICTION_FAILED
    assert "CUDA out of memory" in failed.message
    canceled = snapshot_error(_snapshot(status="canceled"))
    assert canceled is not None and canceled.code == errors.PREDICTION_CANCELED
    aborted = _snapshot(status="aborted")
    assert aborted.is_terminal and snapshot_error(aborted).code == errors.PREDICTION_CANCELED  # type: ignore[union-attr]
    expired = snapshot_error(_snapshot(output=None, data_removed=True))
    assert expired is not None and expired.code == errors.OUTPUT_EXPIRED
    marked = dataclasses.replace(_snapshot(status="canceled"), deadline_exceeded=True)
    assert snapshot_error(marked).code == errors.DEADLINE_EXCEEDED  # type: ignore[union-attr]


def test_generation_error_pickles_with_all_attributes() -> None:
    err = GenerationError(errors.RATE_LIMITED, "slow down", True, retry_after_s=2.0)
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.code, copy.message, copy.retryable, copy.retry_after_s) == (
        errors.RATE_LIMITED,
        "slow down",
        True,
        2.0,
    )


def test_cursor_never_leaves_base_origin() -> None:
    base = "http://127.0.0.1:5000"
    assert rr._cursor_path("http://127.0.0.1:5000/v1/predictions?cursor=a", base).startswith(base)
    assert rr._cursor_path("https://evil.test/v1/predictions?cursor=a", base) == (
        "/v1/predictions?cursor=a"
    )


def test_token_is_not_in_resource_repr() -> None:
    resource = ReplicateResource(api_token="r8_supersecret_value")
    assert "r8_supersecret_value" not in repr(resource)
    assert "r8_supersecret_value" not in str(resource)


def test_backoff_honours_retry_after_and_grows() -> None:
    resource = ReplicateResource(api_token="t", retry_backoff_s=0.1)
    assert 2.0 <= resource._backoff(1, 2.0) <= 2.5
    assert 0.05 <= resource._backoff(1) <= 0.1
    assert 0.4 <= resource._backoff(4) <= 0.8
    assert resource._backoff(50) <= rr._MAX_SLEEP_S


# --------------------------------------------------------------------------------------------
# Over real HTTP against the emulator

MakeResource = Callable[..., ReplicateResource]
IMAGE = "demo/pixel-sketch"
SMALL = {"width": 64, "height": 64}


def _emulated(handle: Any) -> dict[str, dict[str, Any]]:
    return {p["id"]: p for p in handle.predictions()}


def _lift_after_first(handle: Any, counter: str) -> threading.Thread:
    """A started thread that turns the emulator's faults off once ``counter`` counts one."""

    def lift() -> None:
        deadline = time.monotonic() + 10
        while handle.stats()[counter] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        handle.configure(faults=Faults())

    lifter = threading.Thread(target=lift)
    lifter.start()
    return lifter


def _requests(handle: Any, route_fragment: str) -> int:
    return sum(n for route, n in handle.stats()["requests"].items() if route_fragment in route)


def test_create_by_model_and_by_version(emulator: Any, make_replicate: MakeResource) -> None:
    resource = make_replicate()
    by_model = resource.create(IMAGE, {"prompt": "a red fox", "seed": 1, **SMALL})
    assert by_model.status in ("starting", "processing") and not by_model.is_terminal
    assert by_model.model == IMAGE and by_model.version

    by_version = resource.create(
        f"{IMAGE}:{by_model.version}", {"prompt": "a blue fox", "seed": 2, **SMALL}
    )
    assert by_version.id != by_model.id and by_version.version == by_model.version

    done = {s.id: s for s in resource.wait_many([by_model.id, by_version.id], deadline_s=20)}
    assert {s.status for s in done.values()} == {"succeeded"}
    for snapshot in done.values():
        assert snapshot_error(snapshot) is None
        assert snapshot.output and snapshot.predict_time is not None and snapshot.web_url
        assert snapshot.raw["id"] == snapshot.id
    assert set(_emulated(emulator)) == set(done)


def test_invalid_input_names_the_field(emulator: Any, make_replicate: MakeResource) -> None:
    with pytest.raises(GenerationError) as info:
        make_replicate().create(IMAGE, {"prompt": "too wide", "width": 5000, "height": 64})
    assert info.value.code == errors.INVALID_INPUT and not info.value.retryable
    assert "width" in info.value.message
    assert emulator.predictions() == []


def test_unknown_model_and_version(emulator: Any, make_replicate: MakeResource) -> None:
    resource = make_replicate()
    with pytest.raises(GenerationError) as info:
        resource.create("demo/no-such-model", {"prompt": "x"})
    assert info.value.code == errors.MODEL_NOT_FOUND and not info.value.retryable
    with pytest.raises(GenerationError) as info:
        resource.create(f"{IMAGE}:{'0' * 64}", {"prompt": "x"})
    assert info.value.code == errors.MODEL_NOT_FOUND
    assert emulator.predictions() == []


def test_bad_token_is_unauthorized_and_never_shown(
    emulator: Any, make_replicate: MakeResource
) -> None:
    secret = "r8_wrong_" + "x7Q" * 8
    resource = make_replicate(api_token=secret)
    with pytest.raises(GenerationError) as info:
        resource.create(IMAGE, {"prompt": "x", **SMALL})
    assert info.value.code == errors.UNAUTHORIZED
    with pytest.raises(GenerationError) as get_info:
        resource.get("abc")
    assert get_info.value.code == errors.UNAUTHORIZED
    for err in (info.value, get_info.value):
        chain: BaseException | None = err
        seen: set[int] = set()
        while chain is not None and id(chain) not in seen:  # the cause chain Dagster serializes
            seen.add(id(chain))
            assert secret not in str(chain) and secret not in repr(chain)
            chain = chain.__cause__ or chain.__context__
        assert chain is None  # and it ends: no exception is its own cause
    assert secret not in repr(resource)


def test_token_not_in_transport_errors() -> None:
    """Connection refused: retryable provider_unavailable, no token in the message."""
    secret = "r8_" + "s3cr3t" * 5
    resource = ReplicateResource(
        api_token=secret, base_url="http://127.0.0.1:9", create_attempts=2, retry_backoff_s=0.01
    )
    with pytest.raises(GenerationError) as info:
        resource.create(IMAGE, {"prompt": "x"})
    assert info.value.code == errors.PROVIDER_UNAVAILABLE and info.value.retryable
    assert secret not in str(info.value) and secret not in repr(info.value)


def test_429_on_create_is_retried_into_one_prediction(
    emulator: Any, make_replicate: MakeResource
) -> None:
    emulator.configure(faults=Faults(http_429_rate=1.0, retry_after_s=1))
    lifter = _lift_after_first(emulator, "http_429")
    started = time.monotonic()
    snapshot = make_replicate().create(IMAGE, {"prompt": "throttled", **SMALL})
    lifter.join()
    assert time.monotonic() - started >= 1.0  # Retry-After was honoured
    stats = emulator.stats()
    assert stats["http_429"] >= 1 and stats["creates"] == 1
    assert list(_emulated(emulator)) == [snapshot.id]


def test_500_on_create_never_creates_blindly(emulator: Any, make_replicate: MakeResource) -> None:
    """A 5xx may hide an accepted create: while the list cannot be read, nothing is created."""
    emulator.configure(faults=Faults(http_500_rate=1.0))
    resource = make_replicate(create_attempts=3, request_attempts=2)
    request = {"prompt": "outage", **SMALL}
    with pytest.raises(GenerationError) as info:
        resource.create(IMAGE, request, adopt=_first_candidate(resource, request, time.time()))
    assert info.value.code == errors.PROVIDER_UNAVAILABLE and info.value.retryable
    assert "may have started a prediction" in info.value.message
    assert _requests(emulator, "POST /v1/models") == 1
    assert _requests(emulator, "GET /v1/predictions") >= 2  # looked before each retry
    assert emulator.predictions() == []


def test_500_on_create_then_recovery_creates_once(
    emulator: Any, make_replicate: MakeResource
) -> None:
    emulator.configure(faults=Faults(http_500_rate=1.0))
    lifter = _lift_after_first(emulator, "http_500")
    resource = make_replicate(retry_backoff_s=0.2)
    request = {"prompt": "blip", **SMALL}
    snapshot = resource.create(
        IMAGE, request, adopt=_first_candidate(resource, request, time.time())
    )
    lifter.join()
    assert list(_emulated(emulator)) == [snapshot.id]
    assert emulator.stats()["creates"] == 1


def _first_candidate(
    resource: ReplicateResource, request: dict[str, Any], started_at: float
) -> Callable[[], PredictionSnapshot | None]:
    """An ``adopt`` callback taking the nearest candidate, owned by nobody (no database)."""

    def adopt() -> PredictionSnapshot | None:
        found = resource.lost_create_candidates(
            IMAGE, request, started_at=started_at, model_names=None
        )
        return found[0] if found else None

    return adopt


def test_maybe_created_looks_before_creating(emulator: Any, make_replicate: MakeResource) -> None:
    """Regression: an op retry after a lost create must adopt, not create a second one."""
    resource = make_replicate()
    request = {"prompt": "retried op", "seed": 9, **SMALL}
    started = time.time()
    emulator.configure(faults=Faults(drop_create_rate=1.0))
    # The earlier call died with its create's answer lost: made here with the bare client.
    bare = replicate.Client(api_token=emulator.token, base_url=emulator.base_url)
    with pytest.raises(httpx.RemoteProtocolError):
        bare.models.predictions.create(model=IMAGE, input=request)
    emulator.configure(faults=Faults())
    assert len(emulator.predictions()) == 1
    adopt = _first_candidate(resource, request, started)
    adopted = resource.create(IMAGE, request, adopt=adopt, maybe_created=True)
    assert list(_emulated(emulator)) == [adopted.id]
    assert emulator.stats()["creates"] == 1


def test_dropped_create_is_adopted_not_duplicated(
    emulator: Any, make_replicate: MakeResource
) -> None:
    """Regression: a create whose response is lost must not start a second paid prediction."""
    emulator.configure(faults=Faults(drop_create_rate=1.0))
    resource = make_replicate()
    request = {"prompt": "dropped", "seed": 3, **SMALL}
    snapshot = resource.create(
        IMAGE, request, adopt=_first_candidate(resource, request, time.time())
    )
    stats = emulator.stats()
    assert stats["creates"] == 1 and stats["create_responses_dropped"] == 1
    emulated = _emulated(emulator)
    assert list(emulated) == [snapshot.id]
    assert emulated[snapshot.id]["_emulator"]["response_dropped"] is True


def test_a_lost_answer_without_adopt_is_never_created_again(
    emulator: Any, make_replicate: MakeResource
) -> None:
    emulator.configure(faults=Faults(drop_create_rate=1.0))
    with pytest.raises(GenerationError, match="may have started a prediction"):
        make_replicate().create(IMAGE, {"prompt": "lost", **SMALL})
    assert emulator.stats()["creates"] == 1


def test_every_create_request_is_announced_before_it_is_sent(
    emulator: Any, make_replicate: MakeResource
) -> None:
    """The caller notes each try's answer as in flight (orphan sweeps must not take a
    prediction whose answer is on its way), including a retry after a 429."""
    emulator.configure(faults=Faults(http_429_rate=1.0, retry_after_s=1))
    calls: list[int] = []
    lifter = _lift_after_first(emulator, "http_429")
    resource = make_replicate()
    resource.create(IMAGE, {"prompt": "announced", **SMALL}, before_try=lambda: calls.append(1))
    lifter.join()
    assert len(calls) == _requests(emulator, "POST /v1/models") >= 2


def test_a_list_too_long_to_reach_the_create_is_not_taken_for_absence(
    emulator: Any, make_replicate: MakeResource
) -> None:
    """Regression (review): the list was read for at most a fixed number of pages and a lost
    create further down looked absent, so a second paid prediction was created."""
    emulator.configure(page_size=2)
    resource = make_replicate()
    since = time.time() - 60
    for i in range(5):
        resource.create(IMAGE, {"prompt": f"p{i}", **SMALL})
    assert len(resource.recent_predictions(since, max_pages=1)) == 2  # partial is fine here
    with pytest.raises(GenerationError) as info:
        resource.recent_predictions(since, max_pages=1, complete=True)
    assert info.value.retryable and "more than 1 pages" in info.value.message
    assert len(resource.recent_predictions(since, max_pages=10, complete=True)) == 5


def test_odd_list_entries_are_nobodys_candidates() -> None:
    """One foreign entry of an odd shape in the account's list must not fail a batch."""

    class FakeResource(ReplicateResource):
        def recent_predictions(self, since: float, **kw: Any) -> list[dict]:
            deep: Any = []
            for _ in range(5000):
                deep = [deep]
            return [
                {"id": "p1", "status": "starting", "model": ["not", "a", "name"], "input": {}},
                {"id": "p2", "status": "failed", "model": IMAGE, "input": {}, "error": deep},
                {"id": "p3", "status": "starting", "model": IMAGE, "input": {}},
            ]

    fake = FakeResource(api_token="r8_unused", base_url="http://127.0.0.1:9")
    found = fake.lost_create_candidates(IMAGE, {}, started_at=time.time(), model_names={IMAGE})
    assert [c.id for c in found] == ["p3"]


def test_candidates_are_api_made_same_input_named_models_nearest_first(
    emulator: Any, make_replicate: MakeResource
) -> None:
    """Only what a lost create of this request could have made: not a website prediction, not
    another input, not another model name once names are known, not one from before the
    attempt; the one created nearest the attempt's first create comes first."""
    resource = make_replicate(adopt_window_s=0.5)
    request = {"prompt": "the same", "seed": 1, **SMALL}
    old = resource.create(IMAGE, request)
    time.sleep(1.0)
    started = time.time()
    near = resource.create(IMAGE, request)
    time.sleep(0.2)
    far = resource.create(IMAGE, request)
    web = emulator.web_prediction(IMAGE, request)
    other_input = resource.create(IMAGE, {**request, "seed": 2})

    def ids(names: set[str] | None) -> list[str]:
        found = resource.lost_create_candidates(
            IMAGE, request, started_at=started, model_names=names
        )
        return [c.id for c in found]

    assert ids(None) == [near.id, far.id]
    assert ids({IMAGE}) == [near.id, far.id]
    assert ids({"someone/else"}) == [near.id, far.id]  # the requested name always counts
    assert web["source"] == "web" and web["id"] not in ids(None)
    assert old.id not in ids(None) and other_input.id not in ids(None)


def test_an_aliased_official_model_is_matched_by_its_answered_name(
    emulator: Any, make_replicate: MakeResource
) -> None:
    emulator.configure(model_aliases={IMAGE: "demo/pixel-sketch-official"})
    resource = make_replicate()
    request = {"prompt": "official", **SMALL}
    started = time.time()
    made = resource.create(IMAGE, request)
    assert made.model == "demo/pixel-sketch-official"

    def found(names: set[str] | None) -> list[str]:
        candidates = resource.lost_create_candidates(
            IMAGE, request, started_at=started, model_names=names
        )
        return [c.id for c in candidates]

    assert found(None) == [made.id]  # nothing learned yet: input and time alone
    assert found({"demo/pixel-sketch-official"}) == [made.id]
    assert found({"demo/something-else"}) == []


def test_wait_many_returns_all_and_marks_failures(
    emulator: Any, make_replicate: MakeResource
) -> None:
    resource = make_replicate(poll_workers=4)
    failing = set()
    ids = []
    for i in range(20):
        prompt = f"picture {i}" + (" [fail]" if i % 5 == 0 else "")
        snapshot = resource.create(IMAGE, {"prompt": prompt, "seed": i, **SMALL})
        ids.append(snapshot.id)
        if "[fail]" in prompt:
            failing.add(snapshot.id)

    seen: list[PredictionSnapshot] = []
    max_poll_threads = 0
    for snapshot in resource.wait_many(ids, deadline_s=30):
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
    emulator: Any, make_replicate: MakeResource, garbled: str | None
) -> None:
    """Regression: one prediction the provider could not answer for (an unknown id, a 200 that
    is a proxy's HTML page, JSON without id and status, an output nested deeply enough to raise
    RecursionError) aborted the whole wait before yielding anything, so the op failed and the
    failure hook refunded and canceled the batch, its succeeded and paid predictions too."""
    resource = make_replicate()
    good = [resource.create(IMAGE, {"prompt": f"good {i}", **SMALL}).id for i in range(3)]
    if garbled is None:
        bad = "unknown0prediction0id"
    else:
        bad = resource.create(IMAGE, {"prompt": "answered badly", **SMALL}).id
        emulator.configure(garbled={bad: garbled})
    done = {s.id: s for s in resource.wait_many([*good, bad], deadline_s=30)}
    assert set(done) == {*good, bad}
    assert all(done[p].status == "succeeded" and snapshot_error(done[p]) is None for p in good)
    err = snapshot_error(done[bad])
    assert done[bad].status == "failed" and err is not None
    assert err.code == errors.INTERNAL_ERROR and not err.retryable


def test_an_account_error_still_ends_the_whole_wait(
    emulator: Any, make_replicate: MakeResource
) -> None:
    resource = make_replicate()
    ids = [resource.create(IMAGE, {"prompt": f"p{i}", **SMALL}).id for i in range(2)]
    stranger = make_replicate(api_token="r8_not_the_token")
    with pytest.raises(GenerationError) as info:
        list(stranger.wait_many(ids, deadline_s=10))
    assert info.value.code == errors.UNAUTHORIZED


def test_wait_many_survives_http_500s(emulator: Any, make_replicate: MakeResource) -> None:
    resource = make_replicate()
    ids = [resource.create(IMAGE, {"prompt": f"p{i}", **SMALL}).id for i in range(5)]
    emulator.configure(faults=Faults(http_500_rate=0.4, seed=7))
    done = list(resource.wait_many(ids, deadline_s=20))
    assert sorted(s.id for s in done) == sorted(ids)
    assert all(s.status == "succeeded" for s in done)
    assert emulator.stats()["http_500"] >= 1


def test_stuck_prediction_is_canceled_at_deadline(
    emulator: Any, make_replicate: MakeResource
) -> None:
    resource = make_replicate()
    stuck = resource.create(IMAGE, {"prompt": "never ends [stuck]", **SMALL})
    fine = resource.create(IMAGE, {"prompt": "ends", **SMALL})
    started = time.monotonic()
    done = {s.id: s for s in resource.wait_many([stuck.id, fine.id], deadline_s=1.5)}
    assert time.monotonic() - started < 5
    assert done[fine.id].status == "succeeded" and not done[fine.id].deadline_exceeded
    late = done[stuck.id]
    assert late.status == "canceled" and late.deadline_exceeded
    assert snapshot_error(late).code == errors.DEADLINE_EXCEEDED  # type: ignore[union-attr]
    on_server = _emulated(emulator)[stuck.id]
    assert on_server["status"] == "canceled" and on_server["_emulator"]["canceled_by"] == "api"


def test_a_retried_wait_keeps_the_deadline_of_the_first_create(
    emulator: Any, make_replicate: MakeResource
) -> None:
    """Regression (traced): each retry of the await step restarted the deadline, so a stuck
    prediction could run for as many deadlines as the step had tries."""
    resource = make_replicate()
    stuck = resource.create(IMAGE, {"prompt": "stuck since long ago [stuck]", **SMALL})
    started = time.monotonic()
    # Its attempt first created it an hour ago, with a 30-minute deadline: it is already late.
    [late] = resource.wait_many(
        [stuck.id], deadline_s=1800, deadlines={stuck.id: time.time() - 1800}
    )
    assert time.monotonic() - started < 5
    assert late.status == "canceled" and late.deadline_exceeded


def test_a_prediction_the_provider_canceled_past_its_deadline_exceeded_it(
    emulator: Any, make_replicate: MakeResource
) -> None:
    """Regression (seen in the chaos soak, seed 2): the provider's own Cancel-After stopped a
    stuck prediction while its run was down; the retried wait then reported it as
    ``prediction_canceled`` (canceled by someone else) instead of ``deadline_exceeded``."""
    resource = make_replicate(cancel_after_s=1)
    stuck = resource.create(IMAGE, {"prompt": "left alone [stuck]", **SMALL})
    time.sleep(1.5)  # the provider cancels it meanwhile; its webhook records that
    recorded = resource.get(stuck.id)
    assert recorded.status == "canceled"
    [late] = resource.wait_many(
        [stuck.id],
        deadlines={stuck.id: time.time() - 1},
        lookup={stuck.id: recorded}.get,
        expect_webhooks=True,
    )
    assert late.status == "canceled" and late.deadline_exceeded
    assert snapshot_error(late).code == errors.DEADLINE_EXCEEDED  # type: ignore[union-attr]
    assert _emulated(emulator)[stuck.id]["_emulator"]["canceled_by"] != "api"


def test_a_create_can_send_its_own_cancel_after(
    emulator: Any, make_replicate: MakeResource
) -> None:
    """A metered model's prediction is stopped by the provider soon after what can be charged,
    not at the resource's long default."""
    resource = make_replicate(cancel_after_s=1860)
    own = resource.create(IMAGE, {"prompt": "short", **SMALL}, cancel_after_s=390)
    default = resource.create(IMAGE, {"prompt": "default", **SMALL})
    emulated = _emulated(emulator)
    assert emulated[own.id]["_emulator"]["deadline_s"] == 390
    assert emulated[default.id]["_emulator"]["deadline_s"] == 1860


def test_cancel_is_idempotent(emulator: Any, make_replicate: MakeResource) -> None:
    resource = make_replicate()
    snapshot = resource.create(IMAGE, {"prompt": "quick", **SMALL})
    finished = resource.wait(snapshot.id, deadline_s=20)
    assert finished.status == "succeeded"
    assert resource.cancel(snapshot.id).status == "succeeded"  # no error, nothing changed
    running = resource.create(IMAGE, {"prompt": "stop me [stuck]", **SMALL})
    assert resource.cancel(running.id).status == "canceled"
    assert resource.cancel(running.id).status == "canceled"


def test_lookup_terminal_state_skips_polling(emulator: Any, make_replicate: MakeResource) -> None:
    """A state learned from a webhook (lookup) is used without any GET of that prediction."""
    resource = make_replicate()
    first = resource.create(IMAGE, {"prompt": "from webhook", **SMALL})
    known = dataclasses.replace(first, status="succeeded", output=["https://x.test/o.png"])
    before = _requests(emulator, "GET /v1/predictions/")
    done = list(resource.wait_many([first.id], lookup=lambda _id: known))
    assert done == [known] and done[0] is known
    assert _requests(emulator, "GET /v1/predictions/") == before

    # Nothing known yet: the lookup is asked, then the API is polled until the end.
    second = resource.create(IMAGE, {"prompt": "polled", **SMALL})
    calls: list[str] = []

    def lookup(prediction_id: str) -> PredictionSnapshot | None:
        calls.append(prediction_id)
        return None

    assert resource.wait(second.id, lookup=lookup).status == "succeeded"
    assert calls and set(calls) == {second.id}
    assert _requests(emulator, "GET /v1/predictions/") > before


def test_expect_webhooks_polls_slowly(emulator: Any, make_replicate: MakeResource) -> None:
    """With a webhook expected and nothing in the lookup yet, polling is at poll_max_s."""
    resource = make_replicate(poll_initial_s=0.02, poll_max_s=0.5)
    emulator.configure(latency_s=1.2)
    snapshot = resource.create(IMAGE, {"prompt": "slow", **SMALL})
    before = _requests(emulator, "GET /v1/predictions/")
    done = resource.wait(snapshot.id, lookup=lambda _id: None, expect_webhooks=True)
    polls = _requests(emulator, "GET /v1/predictions/") - before
    assert done.status == "succeeded"
    # Adaptive polling from 20 ms would make about 10 GETs in 1.2 s; slow polling at most ~4.
    assert polls <= 5


def test_create_sends_cancel_after(emulator: Any, make_replicate: MakeResource) -> None:
    """The provider-side deadline (Cancel-After) is set on every create, unless disabled."""
    with_deadline = make_replicate(cancel_after_s=90).create(IMAGE, {"prompt": "a", **SMALL})
    without = make_replicate(cancel_after_s=None).create(IMAGE, {"prompt": "b", **SMALL})
    emulated = _emulated(emulator)
    assert emulated[with_deadline.id]["_emulator"]["deadline_s"] == 90
    assert emulated[without.id]["_emulator"]["deadline_s"] is None


def test_concurrent_creates_from_many_threads(emulator: Any, make_replicate: MakeResource) -> None:
    """One shared client serves many threads: every create lands exactly once."""
    resource = make_replicate()
    results: list[str] = []
    lock = threading.Lock()

    def work(worker: int) -> None:
        for i in range(3):
            snapshot = resource.create(IMAGE, {"prompt": f"w{worker} i{i}", **SMALL})
            with lock:
                results.append(snapshot.id)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == len(set(results)) == 30
    assert set(_emulated(emulator)) == set(results)


def test_wait_many_scales_without_threads(emulator: Any, make_replicate: MakeResource) -> None:
    """Two hundred predictions in flight are watched by at most poll_workers threads."""
    emulator.configure(concurrency=256, latency_s=0.5)
    resource = make_replicate(poll_workers=6, poll_initial_s=0.1, poll_max_s=0.5)
    ids = [resource.create(IMAGE, {"prompt": f"n{i}", **SMALL}).id for i in range(200)]
    seen = set()
    peak = 0
    for snapshot in resource.wait_many(ids, deadline_s=60):
        assert snapshot.status == "succeeded" and snapshot.id not in seen
        seen.add(snapshot.id)
        # The emulator serves each connection on its own thread: count only ours.
        polls = [t for t in threading.enumerate() if t.name.startswith("replicate-poll")]
        peak = max(peak, len(polls))
    assert seen == set(ids)
    assert 1 <= peak <= 6
    # Adaptive polling: far fewer GETs than a fixed fast interval would need.
    assert _requests(emulator, "GET /v1/predictions/") < 200 * 6


def test_resource_in_a_dagster_job(emulator: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Wired as Definitions wire it (token through EnvVar), the resource works inside an op."""
    import dagster as dg

    monkeypatch.setenv("REPLICATE_API_TOKEN", emulator.token)

    @dg.op
    def run_one(replicate: ReplicateResource) -> str:
        snapshot = replicate.create(IMAGE, {"prompt": "inside dagster", **SMALL})
        return replicate.wait(snapshot.id, deadline_s=20).status

    @dg.job
    def one_prediction() -> None:
        run_one()

    resource = ReplicateResource(
        api_token=dg.EnvVar("REPLICATE_API_TOKEN"), base_url=emulator.base_url, poll_max_s=0.3
    )
    result = one_prediction.execute_in_process(resources={"replicate": resource})
    assert result.success and result.output_for_node("run_one") == "succeeded"
    assert len(emulator.predictions()) == 1


def test_lookup_result_wins_over_deadline(emulator: Any, make_replicate: MakeResource) -> None:
    """Past its deadline, a prediction a webhook already reported finished is not canceled."""
    resource = make_replicate()
    running = resource.create(IMAGE, {"prompt": "webhook said done [stuck]", **SMALL})
    reported = dataclasses.replace(running, status="succeeded")
    done = list(resource.wait_many([running.id], deadline_s=0.0, lookup=lambda _id: reported))
    assert done == [reported] and not done[0].deadline_exceeded
    assert _requests(emulator, "/cancel") == 0
    resource.cancel(running.id)  # clean up the stuck prediction


# --------------------------------------------------------------------------------------------
# Waiting without webhooks: the list sweep


def test_list_sweep_finds_every_result_with_a_fraction_of_the_requests(
    emulator: Any, make_replicate: MakeResource
) -> None:
    """Many predictions queued behind the provider's cap: GET polling needs several requests per
    prediction, the sweep one list page per refresh, and the results are the same."""
    resource = make_replicate()
    emulator.configure(latency_s=0.5, concurrency=4)
    ids = [resource.create(IMAGE, {"prompt": f"sweep {i}", **SMALL}).id for i in range(40)]
    gets_before = _requests(emulator, "GET /v1/predictions/")
    sweep = resource.list_sweep(ids)
    done = {s.id: s for s in resource.wait_many(ids, deadline_s=60, sweep=sweep)}
    assert set(done) == set(ids)
    assert all(s.status == "succeeded" and s.output and s.predict_time for s in done.values())
    gets = _requests(emulator, "GET /v1/predictions/") - gets_before
    # Every answer came from the list: no GET of single predictions, and far fewer requests
    # than predictions (the queue took about 5 s to drain).
    assert gets == 0
    assert 1 <= sweep.requests < len(ids) / 2


def test_list_sweep_leaves_unseen_predictions_to_gets(
    emulator: Any, make_replicate: MakeResource
) -> None:
    """A sweep limited to one page of 2 cannot see older predictions: those are polled one by one,
    and every prediction still ends exactly once."""
    resource = make_replicate()
    emulator.configure(page_size=2)
    ids = [resource.create(IMAGE, {"prompt": f"deep {i}", **SMALL}).id for i in range(6)]
    sweep = ListSweep(resource, ids, max_pages=1)
    done = [s.id for s in resource.wait_many(ids, deadline_s=30, sweep=sweep)]
    assert sorted(done) == sorted(ids)
    # Only the two newest were on the one page the sweep reads.
    assert {p for p in ids if sweep.covers(p)} <= set(ids[-2:])
    assert _requests(emulator, "GET /v1/predictions/") >= len(ids) - 2


def test_list_sweep_survives_an_unreadable_list(
    emulator: Any, make_replicate: MakeResource
) -> None:
    resource = make_replicate()
    ids = [resource.create(IMAGE, {"prompt": f"flaky list {i}", **SMALL}).id for i in range(5)]
    emulator.configure(faults=Faults(http_500_rate=0.5, seed=3))
    done = list(resource.wait_many(ids, deadline_s=30, sweep=resource.list_sweep(ids)))
    assert sorted(s.id for s in done) == sorted(ids)
    assert all(s.status == "succeeded" for s in done)


def test_list_sweep_ignores_a_finished_entry_without_its_result() -> None:
    """A provider whose list shows finished predictions without output or metrics: the sweep
    does not take such an entry as the result (a GET reads the whole prediction)."""

    class FakeResource:
        base_url = "https://api.example"

        def __init__(self) -> None:
            self.calls = 0

        def _request_json(self, method: str, path: str, *, attempts: int = 1) -> dict[str, Any]:
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

    fake = FakeResource()
    sweep = ListSweep(fake, ["short", "full"])  # type: ignore[arg-type]
    assert sweep("short") is None and not sweep.covers("short")
    full = sweep("full")
    assert full is not None and full.output == ["https://x/1.png"] and sweep.covers("full")
    assert fake.calls == 1  # one refresh answered both lookups
