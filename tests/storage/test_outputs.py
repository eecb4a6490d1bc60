"""Every shape of a prediction's ``output`` becomes the right files, staged all-or-nothing.

Proves that ``outputs_from_prediction`` maps URL lists, single URLs, text chunks, plain strings,
objects and ``data:`` URIs to the right items (text is never downloaded), and that
``stage_outputs`` writes each item to its own temp file over real HTTP with the recorded size and
sha256 matching the file, and leaves no temp file behind when any item fails.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest

from ai_handler_dagster.errors import OUTPUT_EXPIRED, OUTPUT_REJECTED, GenerationError
from ai_handler_dagster.storage.download import (
    MAX_OUTPUT_ITEMS,
    DownloadPolicy,
    outputs_from_prediction,
    stage_outputs,
)
from tests.support.fileserver import FileServer, png_bytes, wav_bytes

URL_A = "https://replicate.delivery/pbxt/a/out-0.png"
URL_B = "https://replicate.delivery/pbxt/b/out-1.png"


def test_list_of_urls_becomes_one_file_each_in_order() -> None:
    items = outputs_from_prediction([URL_A, URL_B])
    assert [(i.kind, i.url) for i in items] == [("file", URL_A), ("file", URL_B)]


def test_single_url_string_becomes_one_file() -> None:
    items = outputs_from_prediction(URL_A)
    assert [(i.kind, i.url) for i in items] == [("file", URL_A)]


def test_text_chunks_are_joined_not_downloaded() -> None:
    items = outputs_from_prediction(["Once ", "upon ", "a time", "\n"])
    assert len(items) == 1
    assert items[0].kind == "text" and items[0].url is None
    assert items[0].data == b"Once upon a time\n"


def test_plain_string_is_text_even_when_it_mentions_a_url() -> None:
    items = outputs_from_prediction("see https://example.com for more")
    assert [(i.kind, i.data) for i in items] == [("text", b"see https://example.com for more")]


def test_object_output_is_json_plus_the_files_it_references() -> None:
    output = {"audio": URL_A, "meta": {"frames": [URL_B]}, "score": 0.5}
    items = outputs_from_prediction(output)
    assert [i.kind for i in items] == ["file", "file", "json"]
    assert [i.url for i in items[:2]] == [URL_A, URL_B]
    assert json.loads(items[2].data or b"") == output


@pytest.mark.parametrize("output", [42, True, [1, 2, 3], [{"a": 1}], [URL_A, "caption"]])
def test_other_json_values_become_a_json_object(output: object) -> None:
    items = outputs_from_prediction(output)
    assert items[-1].kind == "json"
    assert json.loads(items[-1].data or b"") == output


@pytest.mark.parametrize("output", [None, "", []])
def test_empty_outputs_give_nothing_to_store(output: object) -> None:
    assert outputs_from_prediction(output) == []


def test_too_many_items_are_refused() -> None:
    with pytest.raises(GenerationError) as info:
        outputs_from_prediction([URL_A] * (MAX_OUTPUT_ITEMS + 1))
    assert info.value.code == OUTPUT_REJECTED


def _files(tmp: Path) -> list[str]:
    return sorted(p.name for p in tmp.iterdir())


def test_stage_outputs_downloads_and_writes_each_item(
    file_server: FileServer, tmp_path: Path
) -> None:
    png, wav = png_bytes(), wav_bytes()
    output = {
        "image": file_server.add("/o/0.png", png, "image/png"),
        "audio": file_server.add("/o/1.wav", wav, "audio/wav"),
    }
    staged = stage_outputs(output, DownloadPolicy.embedded(file_server.base_url), tmp_path)
    assert [s.ext for s in staged] == ["png", "wav", "json"]
    assert [s.content_type for s in staged] == ["image/png", "audio/wav", "application/json"]
    for item, body in zip(staged, [png, wav], strict=False):
        assert item.path.read_bytes() == body
        assert item.size == len(body)
        assert item.sha256 == hashlib.sha256(body).hexdigest()
    assert json.loads(staged[2].path.read_bytes()) == output
    assert all(s.path.parent == tmp_path for s in staged)
    assert not any(name.endswith(".part") for name in _files(tmp_path))


def test_stage_text_chunks_as_one_txt(tmp_path: Path) -> None:
    # Text never touches the network, so even the strict production policy is fine.
    staged = stage_outputs(["Hello, ", "wörld"], DownloadPolicy.production(), tmp_path)
    assert len(staged) == 1
    assert staged[0].ext == "txt"
    assert staged[0].content_type == "text/plain; charset=utf-8"
    assert staged[0].path.read_text(encoding="utf-8") == "Hello, wörld"
    assert staged[0].sha256 == hashlib.sha256("Hello, wörld".encode()).hexdigest()


def test_stage_data_uri_is_decoded_and_sniffed(tmp_path: Path) -> None:
    png = png_bytes()
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    staged = stage_outputs([uri], DownloadPolicy.production(), tmp_path)
    assert staged[0].ext == "png" and staged[0].path.read_bytes() == png
    html = "data:image/png;base64," + base64.b64encode(b"<html><script></script>").decode()
    with pytest.raises(GenerationError) as info:
        stage_outputs([html], DownloadPolicy.production(), tmp_path)
    assert info.value.code == OUTPUT_REJECTED


def test_failure_of_one_item_leaves_no_temp_files(file_server: FileServer, tmp_path: Path) -> None:
    ok = file_server.add("/ok.png", png_bytes(), "image/png")
    gone = file_server.url("/missing.png")  # 404 from the server
    with pytest.raises(GenerationError) as info:
        stage_outputs([ok, gone], DownloadPolicy.embedded(file_server.base_url), tmp_path)
    assert info.value.code == OUTPUT_EXPIRED
    assert [s.path for s in file_server.seen] == ["/ok.png", "/missing.png"]
    assert _files(tmp_path) == []
