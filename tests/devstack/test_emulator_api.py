"""The emulator speaks Replicate's HTTP API well enough for the unmodified ``replicate`` client.

Every test drives a live emulator over real HTTP with the official client (or raw HTTP where
the client hides what is checked): create by version, by ``owner/name:version`` and by model
path, get, ``Prefer: wait``, cancel, list with cursor pagination, the model and version
endpoints, and errors (401/404/422/429) surfacing as ``ReplicateError`` with status and title.
"""

from __future__ import annotations

import time

import httpx
import pytest
import replicate
from replicate.exceptions import ReplicateError

from ai_handler_dagster.devstack.emulator import MODELS, EmulatorControl, EmulatorHandle, Faults
from tests.support.emulator import client_for

PS, HT = "demo/pixel-sketch", "demo/haiku-text"
SKETCH = MODELS[PS]
HAIKU = MODELS[HT]
PREDICTION_KEYS = {
    "id", "model", "version", "input", "output", "logs", "error", "status", "created_at",
    "started_at", "completed_at", "data_removed", "metrics", "urls",
}  # fmt: skip


def test_create_by_version_id_runs_to_success(
    client: replicate.Client, emulator: EmulatorHandle, http: httpx.Client
) -> None:
    prediction = client.predictions.create(
        version=SKETCH.version_id, input={"prompt": "a lighthouse", "seed": 3}
    )
    assert prediction.status == "starting"
    assert prediction.model == "demo/pixel-sketch"
    assert prediction.version == SKETCH.version_id
    assert prediction.urls is not None
    assert prediction.urls["get"] == f"{emulator.base_url}/v1/predictions/{prediction.id}"

    prediction.wait()

    assert prediction.status == "succeeded"
    assert prediction.error is None
    assert prediction.started_at and prediction.completed_at
    assert prediction.metrics is not None and prediction.metrics["predict_time"] >= 0.09
    assert prediction.metrics["total_time"] >= prediction.metrics["predict_time"]
    assert prediction.output == [f"{emulator.base_url}/files/{prediction.id}/0.png"]
    raw = http.get(
        prediction.urls["get"], headers={"Authorization": f"Bearer {emulator.token}"}
    ).json()
    assert set(raw) >= PREDICTION_KEYS
    assert raw["data_removed"] is False


def test_create_by_owner_name_version_ref_and_by_model_path(client: replicate.Client) -> None:
    by_ref = client.predictions.create(
        version=f"demo/haiku-text:{HAIKU.version_id}", input={"prompt": "snow"}
    )
    by_model = client.models.predictions.create(model="demo/haiku-text", input={"prompt": "snow"})

    assert by_ref.version == by_model.version == HAIKU.version_id
    assert by_ref.id != by_model.id
    by_ref.wait()
    by_model.wait()
    # Same prompt, same text: the model is deterministic.
    assert by_ref.output == by_model.output
    assert "".join(by_ref.output).count("\n") == 2  # three lines of haiku


def test_ref_with_wrong_version_is_rejected(client: replicate.Client) -> None:
    with pytest.raises(ReplicateError) as info:
        client.predictions.create(version=f"demo/haiku-text:{SKETCH.version_id}", input={})
    assert info.value.status == 422
    assert info.value.title == "Invalid version or not permitted"

    with pytest.raises(ReplicateError) as info:
        client.predictions.create(version="0" * 64, input={"prompt": "x"})
    assert info.value.status == 422


def test_get_reports_progress_then_outcome(
    client: replicate.Client, emulator: EmulatorHandle
) -> None:
    emulator.configure(latency_s=0.3)
    created = client.models.predictions.create(model="demo/haiku-text", input={"prompt": "owl"})

    time.sleep(0.05)
    running = client.predictions.get(created.id)
    assert running.status == "processing"
    assert running.completed_at is None
    created.wait()
    done = client.predictions.get(created.id)
    assert done.status == "succeeded"
    assert done.logs and "Using seed:" in done.logs
    assert done.metrics is not None and done.metrics["output_token_count"] == len(done.output)


def test_prefer_wait_returns_finished_prediction(client: replicate.Client) -> None:
    started = time.monotonic()
    prediction = client.models.predictions.create(
        model="demo/pixel-sketch", input={"prompt": "a cat"}, wait=5
    )
    assert prediction.status == "succeeded"
    assert prediction.output and prediction.output[0].endswith("/0.png")
    assert time.monotonic() - started < 2


def test_prefer_wait_timeout_answers_starting_never_processing(
    client: replicate.Client, emulator: EmulatorHandle
) -> None:
    emulator.configure(latency_s=2.0)
    started = time.monotonic()
    prediction = client.models.predictions.create(
        model="demo/pixel-sketch", input={"prompt": "slow"}, wait=1
    )
    waited = time.monotonic() - started

    assert 0.9 <= waited < 3  # the server held the request for about the asked second
    assert prediction.status == "starting"
    # ... although it is in fact running.
    assert client.predictions.get(prediction.id).status == "processing"
    client.predictions.cancel(prediction.id)


def test_replicate_run_blocks_until_output(client: replicate.Client) -> None:
    chunks = client.run("demo/haiku-text", input={"prompt": "tea"})
    text = "".join(chunks)
    assert len(text.splitlines()) == 3
    assert "tea" in text


def test_cancel_processing_and_queued_predictions(
    client: replicate.Client, emulator: EmulatorHandle
) -> None:
    emulator.configure(latency_s=5.0, concurrency=1)
    running = client.models.predictions.create(model="demo/haiku-text", input={"prompt": "a"})
    queued = client.models.predictions.create(model="demo/haiku-text", input={"prompt": "b"})
    time.sleep(0.05)
    assert client.predictions.get(running.id).status == "processing"
    assert client.predictions.get(queued.id).status == "starting"

    canceled_queued = client.predictions.cancel(queued.id)
    canceled_running = client.predictions.cancel(running.id)

    assert canceled_queued.status == canceled_running.status == "canceled"
    assert canceled_running.completed_at is not None
    assert canceled_running.metrics is not None and "predict_time" in canceled_running.metrics
    # Canceling again is harmless and changes nothing.
    assert client.predictions.cancel(running.id).completed_at == canceled_running.completed_at
    stats = emulator.stats()
    assert stats["paid_predictions"] == 1  # the queued one never ran
    assert stats["final_status"]["canceled"] == 2
    assert stats["running"] == 0


def test_cancel_frees_the_slot_for_the_next_prediction(
    client: replicate.Client, emulator: EmulatorHandle
) -> None:
    emulator.configure(latency_s=5.0, concurrency=1)
    first = client.models.predictions.create(model="demo/haiku-text", input={"prompt": "a"})
    second = client.models.predictions.create(model="demo/haiku-text", input={"prompt": "b"})
    time.sleep(0.05)
    assert client.predictions.get(second.id).status == "starting"

    client.predictions.cancel(first.id)

    assert client.predictions.get(second.id).status == "processing"
    client.predictions.cancel(second.id)


def test_list_is_newest_first_with_absolute_cursors(make_emulator) -> None:
    emulator = make_emulator(page_size=5)
    client = client_for(emulator)
    created = [
        client.models.predictions.create(model="demo/haiku-text", input={"prompt": f"p{i}"}).id
        for i in range(12)
    ]
    newest_first = list(reversed(created))

    pages = []
    page = client.predictions.list()
    pages.append(page)
    while page.next:
        assert page.next.startswith(f"{emulator.base_url}/v1/predictions?cursor=")
        page = client.predictions.list(page.next)
        pages.append(page)

    assert [len(p) for p in pages] == [5, 5, 2]
    assert [p.id for pg in pages for p in pg] == newest_first
    assert pages[0].previous is None
    assert pages[-1].next is None
    # Walking back from the last page returns the same middle page.
    assert pages[-1].previous is not None
    back = client.predictions.list(pages[-1].previous)
    assert [p.id for p in back] == [p.id for p in pages[1]]
    # Results carry what a lost-create search needs: model, version and input.
    first = pages[0][0]
    assert first.model == "demo/haiku-text" and first.input == {"prompt": "p11"}


def test_list_cursors_are_stable_while_new_predictions_arrive(make_emulator) -> None:
    emulator = make_emulator(page_size=3)
    client = client_for(emulator)
    ids = [
        client.models.predictions.create(model="demo/haiku-text", input={"prompt": str(i)}).id
        for i in range(6)
    ]
    first = client.predictions.list()
    client.models.predictions.create(model="demo/haiku-text", input={"prompt": "late"})
    second = client.predictions.list(first.next)
    assert [p.id for p in second] == list(reversed(ids[:3]))


def test_list_filters_by_creation_time(client: replicate.Client, http: httpx.Client) -> None:
    client.models.predictions.create(model="demo/haiku-text", input={"prompt": "old"})
    time.sleep(0.05)
    cutoff = client.predictions.list()[0].created_at
    time.sleep(0.05)
    new = client.models.predictions.create(model="demo/haiku-text", input={"prompt": "new"})

    page = client.predictions.list(f"/v1/predictions?created_after={cutoff}")
    assert [p.id for p in page] == [new.id]


def test_model_and_version_endpoints_describe_inputs(client: replicate.Client) -> None:
    model = client.models.get("demo/pixel-sketch")
    assert model.owner == "demo" and model.name == "pixel-sketch"
    assert model.latest_version is not None
    assert model.latest_version.id == SKETCH.version_id
    assert len(model.latest_version.id) == 64

    version = client.models.get("demo/pixel-sketch").versions.get(SKETCH.version_id)
    schema = version.openapi_schema["components"]["schemas"]["Input"]
    assert schema["required"] == ["prompt"]
    assert schema["properties"]["width"] == {
        "type": "integer",
        "title": "Width",
        "description": "Width in pixels",
        "x-order": 1,
        "default": 256,
        "minimum": 64,
        "maximum": 1024,
    }
    assert schema["properties"]["prompt"]["maxLength"] == 2000
    haiku = client.models.get("demo/haiku-text").latest_version
    assert haiku is not None
    output = haiku.openapi_schema["components"]["schemas"]["Output"]
    assert output["x-cog-array-type"] == "iterator"


def test_unauthenticated_is_401(emulator: EmulatorHandle, http: httpx.Client) -> None:
    bad = client_for(emulator, token="r8_wrong")
    with pytest.raises(ReplicateError) as info:
        bad.predictions.list()
    assert info.value.status == 401
    assert info.value.title == "Unauthenticated"

    response = http.get(f"{emulator.base_url}/v1/predictions")
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/problem+json"
    assert {"type", "title", "status", "detail"} <= set(response.json())
    assert emulator.stats()["creates"] == 0


def test_unknown_prediction_and_model_are_404(client: replicate.Client) -> None:
    for call in (
        lambda: client.predictions.get("doesnotexist"),
        lambda: client.predictions.cancel("doesnotexist"),
        lambda: client.models.get("demo/nope"),
        lambda: client.models.predictions.create(model="demo/nope", input={"prompt": "x"}),
        lambda: client.models.get("demo/pixel-sketch").versions.get("f" * 64),
    ):
        with pytest.raises(ReplicateError) as info:
            call()
        assert info.value.status == 404
        assert info.value.title == "Not found"


@pytest.mark.parametrize(
    ("model", "payload", "field", "kind"),
    [
        (PS, {}, "input", "required"),
        (PS, {"prompt": 7}, "input.prompt", "invalid_type"),
        (PS, {"prompt": ""}, "input.prompt", "string_gte"),
        (PS, {"prompt": "x" * 2001}, "input.prompt", "string_lte"),
        (PS, {"prompt": "x", "width": 32}, "input.width", "number_gte"),
        (PS, {"prompt": "x", "height": 4096}, "input.height", "number_lte"),
        (PS, {"prompt": "x", "width": "wide"}, "input.width", "invalid_type"),
        (PS, {"prompt": "x", "num_outputs": 5}, "input.num_outputs", "number_lte"),
        (PS, {"prompt": "x", "seed": 1.5}, "input.seed", "invalid_type"),
        (HT, {"prompt": "x", "max_tokens": 0}, "input.max_tokens", "number_gte"),
        (HT, {"prompt": "x", "max_tokens": True}, "input.max_tokens", "invalid_type"),
    ],
)
def test_invalid_input_is_422_with_invalid_fields(
    emulator: EmulatorHandle,
    client: replicate.Client,
    http: httpx.Client,
    model: str,
    payload: dict,
    field: str,
    kind: str,
) -> None:
    with pytest.raises(ReplicateError) as info:
        client.models.predictions.create(model=model, input=payload)
    assert info.value.status == 422
    assert info.value.title == "Input validation failed"

    response = http.post(
        f"{emulator.base_url}/v1/models/{model}/predictions",
        json={"input": payload},
        headers={"Authorization": f"Bearer {emulator.token}"},
    )
    problem = response.json()
    assert problem["invalid_fields"] == [
        {"type": kind, "field": field, "description": problem["invalid_fields"][0]["description"]}
    ]
    assert field in problem["detail"]
    assert emulator.stats()["creates"] == 0


def test_unknown_input_fields_are_ignored_and_echoed(client: replicate.Client) -> None:
    prediction = client.models.predictions.create(
        model="demo/haiku-text", input={"prompt": "fog", "temperature": 0.7}, wait=5
    )
    assert prediction.status == "succeeded"
    assert prediction.input == {"prompt": "fog", "temperature": 0.7}


def test_injected_429_on_create_surfaces_with_retry_after(
    emulator: EmulatorHandle, client: replicate.Client, http: httpx.Client
) -> None:
    emulator.configure(faults=Faults(http_429_rate=1.0, retry_after_s=0))
    with pytest.raises(ReplicateError) as info:
        client.models.predictions.create(model="demo/haiku-text", input={"prompt": "x"})
    assert info.value.status == 429
    assert info.value.title == "Request was throttled"

    response = http.post(
        f"{emulator.base_url}/v1/predictions",
        json={"version": HAIKU.version_id, "input": {"prompt": "x"}},
        headers={"Authorization": f"Bearer {emulator.token}"},
    )
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "0"
    assert emulator.stats()["creates"] == 0
    assert emulator.stats()["http_429"] == 2


def test_client_retries_throttled_gets_until_they_pass(
    emulator: EmulatorHandle, client: replicate.Client
) -> None:
    prediction = client.models.predictions.create(model="demo/haiku-text", input={"prompt": "x"})
    # Half of the gets are throttled; the client's own retry loop (GET only) gets through.
    emulator.configure(faults=Faults(http_429_rate=0.5, retry_after_s=0, seed=7))
    for _ in range(10):
        assert client.predictions.get(prediction.id).id == prediction.id
    stats = emulator.stats()
    assert stats["http_429"] > 0
    assert stats["requests"]["GET /v1/predictions/{id}"] == 10 + stats["http_429"]

    emulator.configure(faults={"http_429_rate": 1.0})
    with pytest.raises(ReplicateError) as info:
        client.predictions.get(prediction.id)
    assert info.value.status == 429


def test_enforced_rate_limit_throttles_creates(make_emulator, http: httpx.Client) -> None:
    emulator = make_emulator(rate_limit=True, creates_per_minute=3)
    client = client_for(emulator)
    for _ in range(3):
        client.models.predictions.create(model="demo/haiku-text", input={"prompt": "x"})
    with pytest.raises(ReplicateError) as info:
        client.models.predictions.create(model="demo/haiku-text", input={"prompt": "x"})
    assert info.value.status == 429

    response = http.post(
        f"{emulator.base_url}/v1/models/demo/haiku-text/predictions",
        json={"input": {"prompt": "x"}},
        headers={"Authorization": f"Bearer {emulator.token}"},
    )
    assert response.status_code == 429
    assert response.headers["Retry-After"].isdigit()
    assert int(response.headers["Retry-After"]) >= 1
    assert response.headers["ratelimit-remaining"] == "0"
    # Reads have their own budget and still pass.
    assert len(client.predictions.list()) == 3
    assert emulator.stats()["rate_limited"] == 2


def test_every_response_carries_ratelimit_headers(make_emulator, http: httpx.Client) -> None:
    # A small budget (one request a second refills) so that the drop between two calls shows.
    emulator = make_emulator(requests_per_minute=60)
    auth = {"Authorization": f"Bearer {emulator.token}"}
    first = http.get(f"{emulator.base_url}/v1/predictions", headers=auth)
    second = http.get(f"{emulator.base_url}/v1/predictions", headers=auth)
    missing = http.get(f"{emulator.base_url}/v1/predictions/nope", headers=auth)
    unauth = http.get(f"{emulator.base_url}/v1/predictions")
    for response in (first, second, missing, unauth):
        assert response.headers["ratelimit-remaining"].isdigit()
        assert response.headers["ratelimit-reset"].isdigit()
    assert int(second.headers["ratelimit-remaining"]) < int(first.headers["ratelimit-remaining"])


def test_webhook_secret_endpoint(emulator: EmulatorHandle, client: replicate.Client) -> None:
    secret = client.webhooks.default.secret()
    assert secret.key == emulator.webhook_secret
    assert secret.key.startswith("whsec_")


def test_stats_count_requests_by_route(emulator: EmulatorHandle, client: replicate.Client) -> None:
    prediction = client.models.predictions.create(model="demo/haiku-text", input={"prompt": "x"})
    client.predictions.get(prediction.id)
    client.predictions.get(prediction.id)
    client.predictions.list()

    requests = emulator.stats()["requests"]
    assert requests["POST /v1/models/{owner}/{name}/predictions"] == 1
    assert requests["GET /v1/predictions/{id}"] == 2
    assert requests["GET /v1/predictions"] == 1
    assert emulator.stats()["responses_by_status"] == {"200": 3, "201": 1}


def test_official_models_hide_their_version_when_run_by_model_path(make_emulator) -> None:
    emulator = make_emulator(official_models=(HT,))
    client = client_for(emulator)

    by_path = client.models.predictions.create(model=HT, input={"prompt": "x"})
    by_version = client.predictions.create(version=HAIKU.version_id, input={"prompt": "x"})
    other = client.models.predictions.create(model=PS, input={"prompt": "x"})

    assert by_path.version == "hidden"
    assert client.predictions.get(by_path.id).version == "hidden"
    assert by_version.version == HAIKU.version_id
    assert other.version == SKETCH.version_id


def test_raw_http_edge_cases(emulator: EmulatorHandle, http: httpx.Client) -> None:
    auth = {"Authorization": f"Bearer {emulator.token}"}
    base = emulator.base_url

    def chunked_body():
        yield b'{"input": {"prompt": "chunked"}'
        yield b"}"

    created = http.post(f"{base}/v1/models/{HT}/predictions", content=chunked_body(), headers=auth)
    assert created.status_code == 201
    assert created.json()["input"] == {"prompt": "chunked"}

    bad_json = http.post(f"{base}/v1/predictions", content=b"{oops", headers=auth)
    assert bad_json.status_code == 400
    assert bad_json.headers["content-type"] == "application/problem+json"

    wrong_method = http.delete(f"{base}/v1/predictions", headers=auth)
    assert wrong_method.status_code == 405
    assert http.get(f"{base}/v1/nothing-here", headers=auth).status_code == 404
    assert http.get(f"{base}/v1/predictions?cursor=garbage", headers=auth).status_code == 400

    done = http.post(
        f"{base}/v1/models/{PS}/predictions",
        json={"input": {"prompt": "head", "width": 64}},
        headers={**auth, "Prefer": "wait=5"},
    ).json()
    head = http.head(done["output"][0])
    assert head.status_code == 200
    assert int(head.headers["content-length"]) > 0
    assert head.content == b""
    assert http.get(done["urls"]["web"]).headers["content-type"].startswith("text/html")


def test_a_burst_of_one_lets_one_create_through_then_paces_them(
    make_emulator, http: httpx.Client
) -> None:
    # The bucket used to hold a full minute's worth: at 6 creates a minute, six went through at
    # once, so the emulator could not stand for an account with little credit (a few creates a
    # minute, one at a time).
    emulator = make_emulator(rate_limit=True, creates_per_minute=6, creates_burst=1)
    client = client_for(emulator)
    client.models.predictions.create(model="demo/haiku-text", input={"prompt": "x"})
    response = http.post(
        f"{emulator.base_url}/v1/models/demo/haiku-text/predictions",
        json={"input": {"prompt": "x"}},
        headers={"Authorization": f"Bearer {emulator.token}"},
    )
    assert response.status_code == 429
    # One token refills every 10 s at 6 a minute; the bucket is full again then too.
    assert 9 <= int(response.headers["Retry-After"]) <= 10
    assert 9 <= int(response.headers["ratelimit-reset"]) <= 10
    assert emulator.stats()["rate_limited"] == 1
    # Reconfigured at runtime, the larger burst applies at once (after the bucket refills).
    emulator.configure(creates_burst=3, creates_per_minute=6000)
    time.sleep(0.05)
    for _ in range(3):
        client.models.predictions.create(model="demo/haiku-text", input={"prompt": "x"})


def test_a_rate_limit_phase_switched_on_and_off_over_the_control_api(
    make_emulator, http: httpx.Client
) -> None:
    """The chaos soak's rate-limited phase: another process turns the create limit on at a low
    rate through ``/_emulator/config``, then back to Replicate's usual budget."""
    emulator = make_emulator()
    client = client_for(emulator)
    auth = {"Authorization": f"Bearer {emulator.token}"}
    url = f"{emulator.base_url}/v1/models/demo/haiku-text/predictions"
    with EmulatorControl(emulator.base_url) as control:
        for _ in range(3):  # not enforced: creates pass
            client.models.predictions.create(model=HT, input={"prompt": "x"})
        control.configure(rate_limit=True, creates_per_minute=12, creates_burst=1)
        assert http.post(url, json={"input": {"prompt": "x"}}, headers=auth).status_code == 201
        throttled = http.post(url, json={"input": {"prompt": "x"}}, headers=auth)
        assert throttled.status_code == 429
        assert throttled.headers["content-type"].startswith("application/problem+json")
        # One token every 5 s at 12 a minute.
        assert 1 <= int(throttled.headers["Retry-After"]) <= 5
        assert throttled.headers["ratelimit-remaining"] == "0"
        assert 1 <= int(throttled.headers["ratelimit-reset"]) <= 5
        assert control.stats()["rate_limited"] == 1
        # Reads keep their own (unspent) budget.
        assert http.get(f"{emulator.base_url}/v1/predictions", headers=auth).status_code == 200

        control.configure(rate_limit=False, creates_per_minute=600, creates_burst=600)
        assert control.config()["rate_limit"] is False
        for _ in range(3):
            response = http.post(url, json={"input": {"prompt": "x"}}, headers=auth)
            assert response.status_code == 201
            assert response.headers["ratelimit-remaining"].isdigit()
        assert control.stats()["rate_limited"] == 1
