"""S3 writes over real HTTP to a local S3 endpoint: exact keys, verified content, no duplicates.

Proves the deterministic key scheme, that an upload stores exactly the staged bytes with its
Content-Type and a ``sha256`` metadata entry matching the recorded checksum, that writing again
overwrites the same key (one object, never two), that a staged file altered on disk is refused,
that objects are private, and that presigned links fetch the object.
"""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from ai_handler_dagster.errors import INTERNAL_ERROR, GenerationError
from ai_handler_dagster.storage.objects import StagedFile, StoredObject
from ai_handler_dagster.storage.s3 import S3OutputStore, manifest_key, output_key
from tests.support.fileserver import png_bytes


def stage(tmp: Path, name: str, body: bytes, content_type: str, ext: str) -> StagedFile:
    """Write ``body`` to a temp file and describe it as the download step would."""
    path = tmp / name
    path.write_bytes(body)
    return StagedFile(
        path=path,
        content_type=content_type,
        ext=ext,
        size=len(body),
        sha256=hashlib.sha256(body).hexdigest(),
    )


def test_output_keys_are_deterministic() -> None:
    assert output_key(42, 1, 0, "png") == "generations/42/a1/0.png"
    assert output_key(42, 2, 3, "txt", prefix="outputs") == "outputs/generations/42/a2/3.txt"
    assert output_key(7, 1, 1, "wav", prefix="/env/prod/") == "env/prod/generations/7/a1/1.wav"
    for bad in [
        (-1, 1, 0, "png"),
        (1, 0, 0, "png"),
        (1, 1, -1, "png"),
        (1, 1, 0, "p/ng"),
        (1, 1, 0, ""),
        (True, 1, 0, "png"),
    ]:
        with pytest.raises(ValueError):
            output_key(*bad)  # type: ignore[arg-type]


def test_manifest_keys() -> None:
    assert manifest_key("run1", "store", "result") == "_manifests/run1/store/result.json"
    assert manifest_key("r", "s", "out", "p", mapping_key="k1") == "p/_manifests/r/s/out/k1.json"
    with pytest.raises(ValueError):
        manifest_key("r/1", "s", "out")


def test_put_file_writes_exact_key_bytes_type_and_checksum(
    s3_client: Any, bucket: str, tmp_path: Path
) -> None:
    body = png_bytes((32, 32))
    staged = stage(tmp_path, "a.png", body, "image/png", "png")
    store = S3OutputStore(s3_client, bucket, prefix="outputs")
    stored = store.store_generation(42, 1, [staged])
    key = "outputs/generations/42/a1/0.png"
    assert stored == [
        StoredObject(
            bucket=bucket,
            key=key,
            uri=f"s3://{bucket}/{key}",
            size=len(body),
            sha256=hashlib.sha256(body).hexdigest(),
            content_type="image/png",
        )
    ]
    assert store.list_keys() == [key]
    obj = s3_client.get_object(Bucket=bucket, Key=key)
    assert obj["Body"].read() == body
    assert obj["ContentType"] == "image/png"
    assert obj["Metadata"] == {"sha256": hashlib.sha256(body).hexdigest()}
    assert stored[0].to_json() == {
        "bucket": bucket,
        "key": key,
        "uri": f"s3://{bucket}/{key}",
        "size": len(body),
        "sha256": hashlib.sha256(body).hexdigest(),
        "content_type": "image/png",
    }
    assert StoredObject.from_json(stored[0].to_json()) == stored[0]


def test_rerun_overwrites_the_same_keys(s3_client: Any, bucket: str, tmp_path: Path) -> None:
    store = S3OutputStore(s3_client, bucket)
    first = [
        stage(tmp_path, "1.png", png_bytes(color="red"), "image/png", "png"),
        stage(tmp_path, "1.txt", b"caption one", "text/plain; charset=utf-8", "txt"),
    ]
    store.store_generation(9, 1, first)
    again = [
        stage(tmp_path, "2.png", png_bytes(color="blue"), "image/png", "png"),
        stage(tmp_path, "2.txt", b"caption two", "text/plain; charset=utf-8", "txt"),
    ]
    stored = store.store_generation(9, 1, again)
    assert store.list_keys() == ["generations/9/a1/0.png", "generations/9/a1/1.txt"]
    versions = s3_client.list_object_versions(Bucket=bucket).get("Versions", [])
    assert len(versions) == 2  # no versioning, no stray copies
    body = s3_client.get_object(Bucket=bucket, Key="generations/9/a1/1.txt")["Body"].read()
    assert body == b"caption two"
    assert stored[0].sha256 == again[0].sha256


def test_staged_file_changed_on_disk_is_refused(
    s3_client: Any, bucket: str, tmp_path: Path
) -> None:
    staged = stage(tmp_path, "a.png", png_bytes(), "image/png", "png")
    staged.path.write_bytes(b"tampered")
    store = S3OutputStore(s3_client, bucket)
    with pytest.raises(GenerationError) as info:
        store.store_generation(1, 1, [staged])
    assert info.value.code == INTERNAL_ERROR
    assert store.list_keys() == []


def test_objects_are_private_and_presigned_links_work(
    s3_client: Any, bucket: str, tmp_path: Path
) -> None:
    body = png_bytes()
    store = S3OutputStore(s3_client, bucket)
    [stored] = store.store_generation(5, 1, [stage(tmp_path, "x.png", body, "image/png", "png")])
    grants = s3_client.get_object_acl(Bucket=bucket, Key=stored.key)["Grants"]
    assert [g["Permission"] for g in grants] == ["FULL_CONTROL"]
    assert all("URI" not in g["Grantee"] for g in grants)  # no AllUsers / AuthenticatedUsers
    url = store.presign(stored.key, expires_s=120)
    assert "Signature" in url or "X-Amz-Signature" in url
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.read() == body
        assert response.headers["Content-Type"] == "image/png"


def test_json_round_trip(s3_client: Any, bucket: str) -> None:
    store = S3OutputStore(s3_client, bucket, prefix="p")
    key = manifest_key("r", "s", "result", store.prefix)
    store.put_json(key, {"generations": {"1": []}})
    assert store.get_json(key) == {"generations": {"1": []}}
    assert store.list_keys() == ["p/_manifests/r/s/result.json"]
