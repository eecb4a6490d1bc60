"""S3 writes for generation outputs: deterministic keys, verified uploads, presigned links.

Keys are ``[<prefix>/]generations/<generation id>/a<attempt>/<index>.<ext>``: a retried or
re-executed step of an attempt writes the same keys again, so an attempt never ends up with
duplicate objects, and a later attempt (a regenerate) never overwrites what an earlier one
delivered. Objects are private (no ACL is ever set); people reach them through presigned links.
(Objects written before attempts had their own folder stay at ``generations/<id>/<index>.<ext>``,
where their generation's record points; nothing is moved.)
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from typing import Any

from ai_handler_dagster.errors import INTERNAL_ERROR, GenerationError
from ai_handler_dagster.storage.objects import StagedFile, StoredObject

_EXT = re.compile(r"^[a-z0-9]{1,10}$")
_HASH_CHUNK = 1024 * 1024


def _join(prefix: str, *parts: str) -> str:
    # Tolerate "outputs", "outputs/" and "/outputs/" alike; S3 keys never start with a slash.
    clean = prefix.strip("/")
    return "/".join([clean, *parts]) if clean else "/".join(parts)


def _count(value: int, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an int >= {minimum}, got {value!r}")
    return value


def attempt_prefix(generation_id: int, attempt: int, prefix: str = "") -> str:
    """The folder of one attempt's outputs: ``generations/<id>/a<attempt>/``."""
    _count(generation_id, "generation id", 0)
    _count(attempt, "attempt", 1)
    return _join(prefix, "generations", str(generation_id), f"a{attempt}") + "/"


def output_key(generation_id: int, attempt: int, index: int, ext: str, prefix: str = "") -> str:
    """The key of output number ``index`` of an attempt:
    ``generations/<id>/a<attempt>/<index>.<ext>``."""
    _count(index, "output index", 0)
    if not _EXT.match(ext):
        raise ValueError(f"extension must be 1-10 lowercase letters or digits, got {ext!r}")
    return attempt_prefix(generation_id, attempt, prefix) + f"{index}.{ext}"


def manifest_key(
    run_id: str, step_key: str, output_name: str, prefix: str = "", mapping_key: str | None = None
) -> str:
    """Key of the manifest of one step output: ``_manifests/<run>/<step>/<output>.json``.

    A dynamic output's mapping key becomes a sub-path (``<output>/<mapping key>.json``).
    """
    for part in (run_id, step_key, output_name, mapping_key or "x"):
        if not part or "/" in part:
            raise ValueError(f"manifest key part {part!r} must be non-empty without '/'")
    leaf = f"{output_name}/{mapping_key}.json" if mapping_key else f"{output_name}.json"
    return _join(prefix, "_manifests", run_id, step_key, leaf)


def file_sha256(path: Any) -> tuple[str, int]:
    """Hex sha256 and size of a local file, read in chunks."""
    hasher = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            hasher.update(chunk)
            size += len(chunk)
    return hasher.hexdigest(), size


class S3OutputStore:
    """Writes and reads generation outputs in one bucket, under an optional key prefix.

    ``client`` is a boto3 S3 client (thread-safe, so one store may upload from several threads),
    e.g. ``dagster_aws.s3.S3Resource(...).get_client()``.
    """

    def __init__(
        self, client: Any, bucket: str, prefix: str = "", *, presign_client: Any = None
    ) -> None:
        if not bucket:
            raise ValueError("bucket must be set")
        self.client = client
        # Links are signed with Signature Version 4 (the client's default may be the legacy
        # version 2, which regions opened since 2014 refuse).
        self.presign_client = presign_client or client
        self.bucket = bucket
        self.prefix = prefix

    def key_for(self, generation_id: int, attempt: int, index: int, ext: str) -> str:
        """Deterministic key of one output under this store's prefix."""
        return output_key(generation_id, attempt, index, ext, self.prefix)

    def uri(self, key: str) -> str:
        """``s3://bucket/key``."""
        return f"s3://{self.bucket}/{key}"

    def put_file(self, staged: StagedFile, key: str) -> StoredObject:
        """Upload a staged file to ``key`` (overwriting), verified end to end.

        The temp file is hashed first and must still match what the download recorded; the
        upload carries that checksum so S3 refuses bytes altered in transit, and the checksum S3
        reports back (when it reports one) must be that one. No read-back request: the upload's
        own answer is the proof.

        Raises:
            GenerationError: ``internal_error`` when the file or the stored object does not
                match the recorded size and sha256.
        """
        digest, size = file_sha256(staged.path)
        if digest != staged.sha256 or size != staged.size:
            raise GenerationError(
                INTERNAL_ERROR,
                f"staged file for {key} changed on disk: {size} bytes sha256 {digest}, "
                f"expected {staged.size} bytes sha256 {staged.sha256}",
            )
        checksum_b64 = base64.b64encode(bytes.fromhex(digest)).decode("ascii")
        with open(staged.path, "rb") as body:
            response = self.client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=body,
                ContentLength=size,
                ContentType=staged.content_type,
                ChecksumSHA256=checksum_b64,
                Metadata={"sha256": digest},
            )
        # S3 checks the bytes it received against ChecksumSHA256 and refuses a mismatch
        # (BadDigest); stores that echo a checksum back must echo ours.
        stored_checksum = response.get("ChecksumSHA256")
        if stored_checksum and stored_checksum != checksum_b64:
            raise GenerationError(
                INTERNAL_ERROR,
                f"object {self.uri(key)} failed verification: stored checksum "
                f"{stored_checksum} != {checksum_b64}",
            )
        return StoredObject(
            bucket=self.bucket,
            key=key,
            uri=self.uri(key),
            size=size,
            sha256=digest,
            content_type=staged.content_type,
        )

    def store_generation(
        self, generation_id: int, attempt: int, files: list[StagedFile]
    ) -> list[StoredObject]:
        """Upload the staged outputs of one attempt to their deterministic keys, in order."""
        return [
            self.put_file(staged, self.key_for(generation_id, attempt, index, staged.ext))
            for index, staged in enumerate(files)
        ]

    def delete_attempt(self, generation_id: int, attempt: int) -> int:
        """Delete every object of one attempt (it ended without success: nothing delivered may
        stay readable); returns how many there were."""
        keys = self.list_keys(attempt_prefix(generation_id, attempt, self.prefix))
        for start in range(0, len(keys), 1000):
            chunk = keys[start : start + 1000]
            self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in chunk], "Quiet": True}
            )
        return len(keys)

    def presign(self, key: str, expires_s: int = 3600) -> str:
        """A time-limited GET link to a private object."""
        return str(
            self.presign_client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=int(expires_s)
            )
        )

    def put_json(self, key: str, document: Any) -> None:
        """Write a small JSON document."""
        body = json.dumps(document, sort_keys=True, separators=(",", ":")).encode("utf-8")
        self.client.put_object(
            Bucket=self.bucket, Key=key, Body=body, ContentType="application/json"
        )

    def get_json(self, key: str) -> Any:
        """Read a JSON document written by :meth:`put_json`."""
        response = self.client.get_object(Bucket=self.bucket, Key=key)
        with response["Body"] as body:
            return json.loads(body.read())

    def list_keys(self, under: str = "") -> list[str]:
        """Every key under ``under`` (relative to the bucket root), sorted."""
        keys: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=under):
            keys.extend(item["Key"] for item in page.get("Contents", []))
        return sorted(keys)
