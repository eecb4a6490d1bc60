"""The IO manager that persists generation outputs to S3 and hands downstream steps their URIs.

The op that stores outputs returns ``dict[int, AttemptFiles]`` (generation id -> the attempt and
the files the download step staged in local temp files). ``handle_output`` uploads every file to its
deterministic key, verifies it, deletes the temp file and writes a JSON manifest for that step
output. ``load_input`` reads only the manifest, so the downstream op may run in another process,
container or machine: nothing assumes a shared disk.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
from collections.abc import Mapping
from typing import Any

from dagster import ConfigurableIOManager, InputContext, MetadataValue, OutputContext
from dagster_aws.s3 import S3Resource
from pydantic import Field, PrivateAttr

from ai_handler_dagster.storage.objects import AttemptFiles, StagedFile, StoredObject
from ai_handler_dagster.storage.s3 import S3OutputStore, manifest_key

MANIFEST_FORMAT = 2
# Metadata is for people: list at most this many URIs in the Dagster UI.
_MAX_LISTED_URIS = 50


def _validate(obj: Any) -> dict[int, AttemptFiles]:
    if not isinstance(obj, Mapping):
        raise TypeError(
            f"GenerationOutputsIOManager stores dict[int, AttemptFiles], got {type(obj)!r}"
        )
    out: dict[int, AttemptFiles] = {}
    for generation_id, staged in obj.items():
        if isinstance(generation_id, bool) or not isinstance(generation_id, int):
            raise TypeError(f"generation ids must be ints, got {generation_id!r}")
        if not isinstance(staged, AttemptFiles) or not all(
            isinstance(f, StagedFile) for f in staged.files
        ):
            raise TypeError(f"outputs of generation {generation_id} must be AttemptFiles")
        out[generation_id] = staged
    return out


class GenerationOutputsIOManager(ConfigurableIOManager):
    """Stores staged generation outputs in S3 and loads them back as ``StoredObject`` lists.

    Objects go to ``[<prefix>/]generations/<generation id>/a<attempt>/<index>.<ext>``; the
    manifest of each
    step output to ``[<prefix>/]_manifests/<run id>/<step key>/<output name>.json``.
    """

    s3: S3Resource = Field(
        description="S3 connection (set endpoint_url for an S3-compatible store such as the "
        "embedded local endpoint)."
    )
    bucket: str = Field(description="Bucket that holds the generation outputs.")
    prefix: str = Field(
        default="", description="Key prefix for every object this IO manager writes ('' = none)."
    )
    presign_expires_s: int = Field(
        default=3600,
        description="Lifetime in seconds of the presigned preview link added to output metadata.",
    )
    upload_concurrency: int = Field(
        default=8,
        description="Uploads run in parallel on this many threads (a batch may hold dozens of "
        "generations).",
    )

    _store: S3OutputStore | None = PrivateAttr(default=None)

    def store(self) -> S3OutputStore:
        """The output store of this run, its clients made once (creating a boto3 client loads
        and parses the S3 service model: a tenth of a second each)."""
        if self._store is None:
            self._store = S3OutputStore(
                self.s3.get_client(),
                self.bucket,
                self.prefix,
                presign_client=self._presign_client(),
            )
        return self._store

    def _presign_client(self) -> Any:
        """A client for presigned links only: the resource's settings, Signature Version 4."""
        import boto3
        from botocore.config import Config as BotoConfig

        return boto3.session.Session(profile_name=self.s3.profile_name).client(
            "s3",
            region_name=self.s3.region_name,
            endpoint_url=self.s3.endpoint_url,
            aws_access_key_id=self.s3.aws_access_key_id,
            aws_secret_access_key=self.s3.aws_secret_access_key,
            aws_session_token=self.s3.aws_session_token,
            config=BotoConfig(signature_version="s3v4"),
        )

    def _manifest_key(self, context: OutputContext) -> str:
        return manifest_key(
            context.run_id,
            context.step_key,
            context.name,
            self.prefix,
            context.mapping_key,
        )

    def handle_output(self, context: OutputContext, obj: dict[int, AttemptFiles]) -> None:
        """Upload every staged file, delete the temp files, write the manifest and metadata."""
        batch = _validate(obj)
        store = self.store()
        jobs = [
            (
                generation_id,
                index,
                staged,
                store.key_for(generation_id, outputs.attempt, index, staged.ext),
            )
            for generation_id, outputs in sorted(batch.items())
            for index, staged in enumerate(outputs.files)
        ]
        stored: dict[tuple[int, int], StoredObject] = {}
        try:
            if jobs:
                workers = max(1, min(self.upload_concurrency, len(jobs)))
                with concurrent.futures.ThreadPoolExecutor(
                    max_workers=workers, thread_name_prefix="s3-upload"
                ) as pool:
                    futures = {
                        pool.submit(store.put_file, staged, key): (generation_id, index)
                        for generation_id, index, staged, key in jobs
                    }
                    # Wait for every upload, then raise the first failure: a half-finished batch
                    # fails the step, and a retry rewrites the same keys.
                    for future in concurrent.futures.as_completed(futures):
                        if future.exception() is None:
                            stored[futures[future]] = future.result()
                    for future in futures:
                        future.result()
        finally:
            # Temp files are only a hand-off inside this step; a retry stages them again.
            for _gid, _index, staged, _key in jobs:
                with contextlib.suppress(OSError):
                    staged.path.unlink(missing_ok=True)
            for folder in {staged.path.parent for _gid, _index, staged, _key in jobs}:
                with contextlib.suppress(OSError):  # left alone unless empty
                    folder.rmdir()

        result = {
            generation_id: [stored[(generation_id, i)] for i in range(len(outputs.files))]
            for generation_id, outputs in sorted(batch.items())
        }
        store.put_json(
            self._manifest_key(context),
            {
                "format": MANIFEST_FORMAT,
                "run_id": context.run_id,
                "step_key": context.step_key,
                "output_name": context.name,
                "generations": {
                    str(gid): {
                        "attempt": batch[gid].attempt,
                        "objects": [o.to_json() for o in objs],
                    }
                    for gid, objs in result.items()
                },
            },
        )
        context.add_output_metadata(self._metadata(store, result))

    def _metadata(
        self, store: S3OutputStore, result: dict[int, list[StoredObject]]
    ) -> dict[str, Any]:
        objects = [o for objs in result.values() for o in objs]
        metadata: dict[str, Any] = {
            "generations": MetadataValue.int(len(result)),
            "count": MetadataValue.int(len(objects)),
            "total_bytes": MetadataValue.int(sum(o.size for o in objects)),
            "uris": MetadataValue.json([o.uri for o in objects[:_MAX_LISTED_URIS]]),
        }
        if objects:
            metadata["first_object"] = MetadataValue.url(
                store.presign(objects[0].key, self.presign_expires_s)
            )
        image = next((o for o in objects if o.content_type.startswith("image/")), None)
        if image is not None:
            link = store.presign(image.key, self.presign_expires_s)
            metadata["preview"] = MetadataValue.md(f"![{image.key}]({link})")
        return metadata

    def load_input(self, context: InputContext) -> dict[int, list[StoredObject]]:
        """Read the upstream step output's manifest: generation id -> stored objects."""
        upstream = context.upstream_output
        if upstream is None:
            raise TypeError("GenerationOutputsIOManager only loads outputs of upstream ops")
        document = self.store().get_json(self._manifest_key(upstream))
        if document.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"unknown manifest format {document.get('format')!r}")
        return {
            int(gid): [StoredObject.from_json(item) for item in entry["objects"]]
            for gid, entry in document["generations"].items()
        }
