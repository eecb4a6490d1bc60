"""The emulator's demo models do real, deterministic work, and their outputs are served and
expire like Replicate's.

``demo/pixel-sketch`` outputs are downloadable PNGs that Pillow opens at the requested size,
identical for the same (prompt, seed, size) and different otherwise; ``demo/haiku-text`` writes
the same chunks for the same prompt. After ``retention_s`` outputs are gone: ``output`` null,
``data_removed`` true, file URLs 404.
"""

from __future__ import annotations

import io
import time

import httpx
import pytest
import replicate
from PIL import Image

from ai_handler_dagster.devstack.emulator import MODELS, EmulatorHandle, render_sketch
from tests.support.emulator import client_for


def _run(client: replicate.Client, model: str, payload: dict) -> replicate.prediction.Prediction:
    prediction = client.models.predictions.create(model=model, input=payload, wait=10)
    assert prediction.status == "succeeded", prediction.error
    return prediction


def test_sketch_outputs_are_pngs_of_the_requested_size(
    client: replicate.Client, http: httpx.Client
) -> None:
    prediction = _run(
        client,
        "demo/pixel-sketch",
        {"prompt": "three boats", "width": 320, "height": 96, "num_outputs": 3, "seed": 5},
    )

    assert isinstance(prediction.output, list) and len(prediction.output) == 3
    assert prediction.metrics is not None and prediction.metrics["image_count"] == 3
    bodies = []
    for i, url in enumerate(prediction.output):
        assert url.endswith(f"/files/{prediction.id}/{i}.png")
        response = http.get(url)  # no Authorization: output files are public URLs
        assert response.status_code == 200
        assert response.headers["content-type"] == "image/png"
        image = Image.open(io.BytesIO(response.content))
        image.load()
        assert image.format == "PNG"
        assert image.size == (320, 96)
        bodies.append(response.content)
    # Each output has its own seed (seed + index), so the images differ.
    assert len(set(bodies)) == 3


def test_sketch_is_deterministic_for_prompt_seed_and_size(
    client: replicate.Client, http: httpx.Client
) -> None:
    def png(payload: dict) -> bytes:
        return http.get(_run(client, "demo/pixel-sketch", payload).output[0]).content

    base = {"prompt": "a blue whale", "seed": 42, "width": 128, "height": 128}
    first = png(base)
    assert png(base) == first
    assert png({**base, "seed": 43}) != first
    assert png({**base, "prompt": "a grey whale"}) != first
    assert first == render_sketch("a blue whale", 42, 128, 128)


def test_sketch_without_seed_reports_the_seed_it_used(
    client: replicate.Client, http: httpx.Client
) -> None:
    prediction = _run(client, "demo/pixel-sketch", {"prompt": "random", "width": 64})
    assert prediction.logs is not None
    assert "Using seed: " in prediction.logs
    seed = int(prediction.logs.split("Using seed: ")[1].split()[0])
    again = _run(client, "demo/pixel-sketch", {"prompt": "random", "width": 64, "seed": seed})
    assert http.get(prediction.output[0]).content == http.get(again.output[0]).content


def test_render_draws_something_and_is_cheap() -> None:
    started = time.perf_counter()
    data = render_sketch("a long prompt " * 20, 1, 256, 256)
    elapsed = time.perf_counter() - started

    image = Image.open(io.BytesIO(data)).convert("RGB")
    colours = image.getcolors(maxcolors=256 * 256)
    assert colours is not None and len(colours) > 5  # shapes and text, not a blank canvas
    assert elapsed < 1.0


def test_haiku_is_deterministic_and_respects_max_tokens(client: replicate.Client) -> None:
    first = _run(client, "demo/haiku-text", {"prompt": "harbor lights"})
    second = _run(client, "demo/haiku-text", {"prompt": "harbor lights"})
    short = _run(client, "demo/haiku-text", {"prompt": "harbor lights", "max_tokens": 4})
    other = _run(client, "demo/haiku-text", {"prompt": "mountain snow"})

    assert first.output == second.output
    assert all(isinstance(chunk, str) for chunk in first.output)
    assert "harbor" in "".join(first.output)
    assert short.output == first.output[:4]
    assert other.output != first.output
    assert first.metrics is not None and first.metrics["predict_time"] > 0


def test_text_output_streams_while_processing(
    emulator: EmulatorHandle, client: replicate.Client
) -> None:
    emulator.configure(latency_s=0.6)
    prediction = client.models.predictions.create(
        model="demo/haiku-text", input={"prompt": "waves"}
    )
    time.sleep(0.3)
    partial = client.predictions.get(prediction.id)
    prediction.wait()

    assert partial.status == "processing"
    assert partial.output and len(partial.output) < len(prediction.output)
    assert prediction.output[: len(partial.output)] == partial.output
    assert partial.logs is not None and "1/3" in partial.logs


def test_outputs_expire_after_retention(make_emulator, http: httpx.Client) -> None:
    emulator = make_emulator(latency_s=0.05, retention_s=0.3)
    client = client_for(emulator)
    prediction = _run(client, "demo/pixel-sketch", {"prompt": "ephemeral", "width": 64})
    url = prediction.output[0]
    assert http.get(url).status_code == 200

    time.sleep(0.45)

    expired = client.predictions.get(prediction.id)
    assert expired.status == "succeeded"
    assert expired.output is None
    assert http.get(url).status_code == 404
    raw = http.get(
        expired.urls["get"], headers={"Authorization": f"Bearer {emulator.token}"}
    ).json()
    assert raw["data_removed"] is True
    assert emulator.stats()["outputs_removed"] == 1


def test_lowering_retention_at_runtime_expires_old_outputs(
    emulator: EmulatorHandle, client: replicate.Client, http: httpx.Client
) -> None:
    prediction = _run(client, "demo/pixel-sketch", {"prompt": "kept", "width": 64})
    assert http.get(prediction.output[0]).status_code == 200

    emulator.configure(retention_s=0.0)
    time.sleep(0.1)

    assert client.predictions.get(prediction.id).output is None
    assert http.get(prediction.output[0]).status_code == 404


def test_expire_outputs_control(emulator: EmulatorHandle, client: replicate.Client) -> None:
    kept = _run(client, "demo/haiku-text", {"prompt": "kept"})
    gone = _run(client, "demo/haiku-text", {"prompt": "gone"})

    assert emulator.expire_outputs([gone.id]) == 1

    assert client.predictions.get(gone.id).output is None
    assert client.predictions.get(kept.id).output == kept.output


@pytest.mark.parametrize("model", sorted(MODELS))
def test_validation_fills_defaults_and_ignores_unknown_fields(model: str) -> None:
    inputs, problems = MODELS[model].validate({"prompt": "hi", "unknown": 1})
    assert problems == []
    assert inputs["prompt"] == "hi"
    assert "unknown" not in inputs
    defaults = {f.name: f.default for f in MODELS[model].inputs if f.name != "prompt"}
    assert {k: inputs[k] for k in defaults} == defaults


def test_validation_reports_every_problem_at_once() -> None:
    _, problems = MODELS["demo/pixel-sketch"].validate({"width": 1, "height": "x"})
    assert [(p["type"], p["field"]) for p in problems] == [
        ("required", "input"),
        ("number_gte", "input.width"),
        ("invalid_type", "input.height"),
    ]
    assert problems[0]["description"] == "prompt is required"
    assert problems[2]["description"] == "Invalid type. Expected: integer, given: string"


def test_integral_floats_count_as_integers() -> None:
    inputs, problems = MODELS["demo/pixel-sketch"].validate({"prompt": "x", "width": 128.0})
    assert problems == []
    assert inputs["width"] == 128 and isinstance(inputs["width"], int)


def test_version_ids_are_stable_hex() -> None:
    for model in MODELS.values():
        assert len(model.version_id) == 64
        int(model.version_id, 16)
    assert len({m.version_id for m in MODELS.values()}) == len(MODELS)
