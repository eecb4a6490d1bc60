"""The emulator's hardware cap and fault injection behave as documented, reproducibly.

Covers: the concurrency cap keeps extra predictions ``starting`` (and unpaid) until a slot
frees; model failures (by rate and by the ``[fail]`` prompt trigger); stuck predictions that
only a cancel or a ``Cancel-After`` deadline ends; slow predictions; HTTP 500s on any endpoint;
a dropped create response whose prediction really exists (and the list shows it); outputs
removed right after success; runtime reconfiguration; and identical fault schedules for the
same seed.
"""

from __future__ import annotations

import time

import httpx
import pytest
import replicate
from replicate.exceptions import ReplicateError

from ai_handler_dagster.devstack.emulator import EmulatorHandle, Faults
from tests.support.emulator import client_for

HAIKU = "demo/haiku-text"


def _create(client: replicate.Client, prompt: str = "x", model: str = HAIKU):
    return client.models.predictions.create(model=model, input={"prompt": prompt})


def _statuses(client: replicate.Client, ids: list[str]) -> list[str]:
    return [client.predictions.get(i).status for i in ids]


def test_concurrency_cap_keeps_extra_predictions_starting(make_emulator) -> None:
    emulator = make_emulator(latency_s=0.6, concurrency=2)
    client = client_for(emulator)
    ids = [_create(client, f"p{i}").id for i in range(5)]

    time.sleep(0.1)
    assert _statuses(client, ids) == ["processing"] * 2 + ["starting"] * 3
    stats = emulator.stats()
    assert stats["running"] == 2 and stats["queued"] == 3
    assert stats["paid_predictions"] == 2  # waiting for hardware costs nothing
    queued = client.predictions.get(ids[4])
    assert queued.started_at is None

    assert emulator.wait_idle(timeout=5)
    assert _statuses(client, ids) == ["succeeded"] * 5
    stats = emulator.stats()
    assert stats["max_running"] == 2
    assert stats["paid_predictions"] == 5
    # First come, first served.
    started = [client.predictions.get(i).started_at for i in ids]
    assert started == sorted(started)


def test_raising_concurrency_at_runtime_starts_queued_predictions(make_emulator) -> None:
    emulator = make_emulator(latency_s=5.0, concurrency=0)
    client = client_for(emulator)
    ids = [_create(client, f"p{i}").id for i in range(3)]
    time.sleep(0.05)
    assert _statuses(client, ids) == ["starting"] * 3

    emulator.configure(concurrency=3)

    assert _statuses(client, ids) == ["processing"] * 3
    for i in ids:
        client.predictions.cancel(i)


def test_failure_rate_fails_predictions_after_running(make_emulator) -> None:
    emulator = make_emulator(latency_s=0.05, faults=Faults(failure_rate=1.0))
    client = client_for(emulator)
    prediction = _create(client, model="demo/pixel-sketch")
    prediction.wait()

    assert prediction.status == "failed"
    assert prediction.error and "emulated model failure" in prediction.error
    assert prediction.output is None  # (a text model keeps what it streamed before failing)
    assert prediction.metrics is not None and prediction.metrics["predict_time"] >= 0.04
    stats = emulator.stats()
    assert stats["final_status"]["failed"] == 1
    assert stats["paid_predictions"] == 1  # a failed run still used the hardware
    assert stats["faults_applied"]["failure"] == 1


def test_fail_trigger_in_prompt_always_fails(client: replicate.Client) -> None:
    failed = client.models.predictions.create(
        model="demo/pixel-sketch", input={"prompt": "please [fail] now"}, wait=5
    )
    ok = client.models.predictions.create(
        model="demo/pixel-sketch", input={"prompt": "please succeed"}, wait=5
    )
    assert failed.status == "failed"
    assert failed.error is not None and "[fail]" in failed.error
    assert ok.status == "succeeded"


def test_stuck_prediction_runs_until_canceled(make_emulator) -> None:
    emulator = make_emulator(latency_s=0.05, concurrency=1, faults=Faults(stuck_rate=1.0))
    client = client_for(emulator)
    stuck = _create(client, "a")
    emulator.configure(faults=Faults())
    waiting = _create(client, "b")

    time.sleep(0.3)  # six times the latency
    assert _statuses(client, [stuck.id, waiting.id]) == ["processing", "starting"]

    client.predictions.cancel(stuck.id)
    waiting.wait()
    assert client.predictions.get(stuck.id).status == "canceled"
    assert waiting.status == "succeeded"


def test_cancel_after_header_cancels_at_the_deadline(
    emulator: EmulatorHandle, http: httpx.Client, client: replicate.Client
) -> None:
    response = http.post(
        f"{emulator.base_url}/v1/models/{HAIKU}/predictions",
        json={"input": {"prompt": "forever [stuck]"}},
        headers={"Authorization": f"Bearer {emulator.token}", "Cancel-After": "300ms"},
    )
    assert response.status_code == 201
    prediction_id = response.json()["id"]
    time.sleep(0.1)
    assert client.predictions.get(prediction_id).status == "processing"

    time.sleep(0.35)
    done = client.predictions.get(prediction_id)
    assert done.status == "canceled"
    assert done.logs and "Cancel-After" in done.logs
    assert emulator.stats()["deadline_canceled"] == 1


def test_invalid_cancel_after_is_rejected(emulator: EmulatorHandle, http: httpx.Client) -> None:
    response = http.post(
        f"{emulator.base_url}/v1/models/{HAIKU}/predictions",
        json={"input": {"prompt": "x"}},
        headers={"Authorization": f"Bearer {emulator.token}", "Cancel-After": "soon"},
    )
    assert response.status_code == 400
    assert emulator.stats()["creates"] == 0


def test_slow_predictions_take_slow_factor_times_longer(make_emulator) -> None:
    emulator = make_emulator(latency_s=0.05, faults=Faults(slow_rate=1.0, slow_factor=6))
    client = client_for(emulator)
    prediction = _create(client)
    prediction.wait()
    assert prediction.status == "succeeded"
    assert prediction.metrics is not None and prediction.metrics["predict_time"] >= 0.3


def test_http_500_on_every_api_endpoint_and_files(
    emulator: EmulatorHandle, client: replicate.Client, http: httpx.Client
) -> None:
    prediction = client.models.predictions.create(
        model="demo/pixel-sketch", input={"prompt": "x", "width": 64}, wait=5
    )
    emulator.configure(faults=Faults(http_500_rate=1.0))

    calls = [
        lambda: client.predictions.get(prediction.id),
        lambda: client.predictions.list(),
        lambda: client.predictions.cancel(prediction.id),
        lambda: _create(client),
        lambda: client.models.get(HAIKU),
    ]
    for call in calls:
        with pytest.raises(ReplicateError) as info:
            call()
        assert info.value.status == 500
    assert http.get(prediction.output[0]).status_code == 500
    # The controls are not part of the emulated API and keep working.
    assert http.get(f"{emulator.base_url}/_emulator/stats").status_code == 200
    stats = emulator.stats()
    assert stats["http_500"] == 6
    assert stats["creates"] == 1  # the failed create made nothing


def test_dropped_create_response_leaves_a_real_prediction(make_emulator) -> None:
    emulator = make_emulator(latency_s=0.05, faults=Faults(drop_create_rate=1.0))
    client = client_for(emulator)

    with pytest.raises(httpx.RemoteProtocolError):
        client.models.predictions.create(model=HAIKU, input={"prompt": "lost answer"})

    page = client.predictions.list()
    assert len(page) == 1
    adopted = page[0]
    assert adopted.input == {"prompt": "lost answer"}
    assert adopted.model == HAIKU
    assert emulator.wait_idle(timeout=5)
    assert client.predictions.get(adopted.id).status == "succeeded"
    stats = emulator.stats()
    assert stats["creates"] == 1
    assert stats["create_responses_dropped"] == 1
    assert stats["paid_predictions"] == 1
    assert emulator.predictions()[0]["_emulator"]["response_dropped"] is True
    # The connection was cut, not the server: the next create on the same client works.
    emulator.configure(faults=Faults())
    assert _create(client).status == "starting"


def test_remove_output_fault_deletes_outputs_right_after_success(
    make_emulator, http: httpx.Client
) -> None:
    emulator = make_emulator(latency_s=0.05, faults=Faults(remove_output_rate=1.0))
    client = client_for(emulator)
    prediction = client.models.predictions.create(
        model="demo/pixel-sketch", input={"prompt": "gone", "width": 64}, wait=5
    )
    assert prediction.status == "succeeded"
    time.sleep(0.05)

    again = http.get(
        prediction.urls["get"], headers={"Authorization": f"Bearer {emulator.token}"}
    ).json()
    assert again["status"] == "succeeded"
    assert again["output"] is None
    assert again["data_removed"] is True
    if prediction.output:  # the wait may have seen the URL before it went away
        assert http.get(prediction.output[0]).status_code == 404
    # The emulator's own record still says what the provider returned: an audit counts the
    # outputs a charge was owed from it, after the files are gone.
    (record,) = emulator.predictions()
    assert record["output"] is None
    assert record["_emulator"]["completed_output"] == [
        f"{emulator.base_url}/files/{prediction.id}/0.png"
    ]


def test_runtime_fault_changes_apply_to_new_predictions(
    emulator: EmulatorHandle, client: replicate.Client
) -> None:
    before = _create(client, "before")
    emulator.configure(faults={"failure_rate": 1.0}, latency_s=0.05)
    after = _create(client, "after")
    before.wait()
    after.wait()
    assert before.status == "succeeded"
    assert after.status == "failed"
    assert emulator.config.faults.failure_rate == 1.0
    assert emulator.config.latency_s == 0.05


def test_same_seed_same_fault_schedule(make_emulator) -> None:
    def schedule(seed: int) -> list[str]:
        faults = Faults(failure_rate=0.5, stuck_rate=0.2, slow_rate=0.3, seed=seed)
        emulator = make_emulator(latency_s=0.01, concurrency=50, faults=faults)
        client = client_for(emulator)
        for i in range(20):
            _create(client, f"p{i}")
        return ["+".join(p["_emulator"]["faults"]) or "-" for p in emulator.predictions()]

    first = schedule(11)
    assert schedule(11) == first
    assert schedule(12) != first
    assert {"fail", "stuck", "slow"} <= {f for entry in first for f in entry.split("+")}


def test_invalid_settings_are_refused(emulator: EmulatorHandle) -> None:
    with pytest.raises(ValueError, match="failure_rate"):
        emulator.configure(faults={"failure_rate": 2})
    with pytest.raises(ValueError, match="unknown"):
        emulator.configure(latency=1)
    with pytest.raises(ValueError, match="token"):
        emulator.configure(token="other")
    assert emulator.config.faults.failure_rate == 0.0


def test_token_bucket_burst_and_refill() -> None:
    from ai_handler_dagster.devstack.emulator.ratelimit import TokenBucket

    default = TokenBucket(6)
    assert [default.take(6, enforce=True).allowed for _ in range(7)] == [True] * 6 + [False]
    one = TokenBucket(6, burst=1)
    first, second = one.take(6, enforce=True, burst=1), one.take(6, enforce=True, burst=1)
    assert (first.allowed, second.allowed) == (True, False)
    assert second.retry_after_s == 10 and second.remaining == 0
    # Unenforced, nothing is refused; the headers still tell.
    assert one.take(6, enforce=False, burst=1).allowed
