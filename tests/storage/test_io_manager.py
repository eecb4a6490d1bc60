"""The generation outputs IO manager, end to end over HTTP against a local S3 endpoint.

Proves with real Dagster runs of a tiny two-op job that staged files are uploaded to their exact
deterministic keys with matching sha256/size, that temp files are deleted, that the output
metadata carries count, bytes, URIs and a working presigned preview, that the downstream op gets
``StoredObject`` lists from the manifest (also when it runs in another process), that a re-run
overwrites the same keys, and that a corrupted staged file fails the step without writing.
"""

import hashlib
import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from dagster import (
    Config,
    DagsterEventType,
    EnvVar,
    ExecuteInProcessResult,
    In,
    Out,
    RunConfig,
    execute_job,
    instance_for_test,
    job,
    op,
    reconstructable,
)
from dagster_aws.s3 import S3Resource

from ai_handler_dagster.devstack.s3 import ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY, LocalS3
from ai_handler_dagster.storage.download import DownloadPolicy, stage_outputs
from ai_handler_dagster.storage.io_manager import GenerationOutputsIOManager
from ai_handler_dagster.storage.objects import AttemptFiles, StoredObject
from ai_handler_dagster.storage.s3 import S3OutputStore
from tests.support.fileserver import FileServer, png_bytes

ENDPOINT_VAR = "STORAGE_TEST_S3_ENDPOINT"
BUCKET_VAR = "STORAGE_TEST_S3_BUCKET"
PREFIX = "out"

# Dagster 1.13.27 itself reads the deprecated InitResourceContext.dagster_run when it initialises
# a nested, fully configured resource (our S3Resource field); nothing in this project calls it.
pytestmark = pytest.mark.filterwarnings(
    "ignore:InitResourceContext.dagster_run is deprecated:DeprecationWarning"
)


class StageConfig(Config):
    """What the staging op fetches: generation id -> prediction output, as JSON."""

    outputs_json: str
    emulator_url: str
    tmp_dir: str
    corrupt: bool = False


@op(out=Out(io_manager_key="outputs_io_manager"))
def stage_batch(config: StageConfig) -> dict[int, AttemptFiles]:
    """Stage every generation's outputs locally, as the real store step does (attempt 1)."""
    policy = DownloadPolicy.embedded(config.emulator_url)
    batch = {
        int(gid): AttemptFiles(1, stage_outputs(output, policy, config.tmp_dir))
        for gid, output in json.loads(config.outputs_json).items()
    }
    if config.corrupt:
        first = next(iter(batch.values())).files[0]
        first.path.write_bytes(b"corrupted after download")
    return batch


@op(ins={"stored": In()})
def record(stored: dict[int, list[StoredObject]]) -> dict[str, list[dict[str, Any]]]:
    """Stand-in for the settle step: turns stored objects into the outputs column value."""
    return {str(gid): [o.to_json() for o in objs] for gid, objs in stored.items()}


@job(
    resource_defs={
        "outputs_io_manager": GenerationOutputsIOManager(
            s3=S3Resource(
                endpoint_url=EnvVar(ENDPOINT_VAR),
                region_name=REGION,
                aws_access_key_id=ACCESS_KEY_ID,
                aws_secret_access_key=SECRET_ACCESS_KEY,
            ),
            bucket=EnvVar(BUCKET_VAR),
            prefix=PREFIX,
            presign_expires_s=600,
            upload_concurrency=4,
        )
    }
)
def outputs_job() -> None:
    """Stage, then consume through the IO manager."""
    record(stage_batch())


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch, local_s3: LocalS3, bucket: str) -> str:
    monkeypatch.setenv(ENDPOINT_VAR, local_s3.endpoint_url)
    monkeypatch.setenv(BUCKET_VAR, bucket)
    return bucket


@pytest.fixture
def batch(file_server: FileServer) -> dict[str, Any]:
    """Two generations: two images, and streamed text chunks."""
    return {
        "1": [
            file_server.add("/g1/0.png", png_bytes(color="red"), "image/png"),
            file_server.add("/g1/1.png", png_bytes(color="blue"), "image/png"),
        ],
        "2": ["A short ", "story."],
    }


def _run_config(file_server: FileServer, batch: dict[str, Any], tmp: Path, **kw: Any) -> RunConfig:
    """Stages into a folder of its own under ``tmp``, as the store step does (``mkdtemp``)."""
    staging = tmp / f"staging-{len(list(tmp.iterdir()))}"
    staging.mkdir()
    return RunConfig(
        ops={
            "stage_batch": StageConfig(
                outputs_json=json.dumps(batch),
                emulator_url=file_server.base_url,
                tmp_dir=str(staging),
                **kw,
            )
        }
    )


def _expected(bucket: str) -> dict[str, list[dict[str, Any]]]:
    bodies = {
        "generations/1/a1/0.png": (png_bytes(color="red"), "image/png"),
        "generations/1/a1/1.png": (png_bytes(color="blue"), "image/png"),
        "generations/2/a1/0.txt": (b"A short story.", "text/plain; charset=utf-8"),
    }
    out: dict[str, list[dict[str, Any]]] = {"1": [], "2": []}
    for key, (body, content_type) in bodies.items():
        full = f"{PREFIX}/{key}"
        out[key.split("/")[1]].append(
            {
                "bucket": bucket,
                "key": full,
                "uri": f"s3://{bucket}/{full}",
                "size": len(body),
                "sha256": hashlib.sha256(body).hexdigest(),
                "content_type": content_type,
            }
        )
    return out


def _handled_output_metadata(result: ExecuteInProcessResult) -> dict[str, Any]:
    for event in result.all_events:
        if event.event_type == DagsterEventType.HANDLED_OUTPUT and event.step_key == "stage_batch":
            return {k: v.value for k, v in event.event_specific_data.metadata.items()}  # type: ignore[union-attr]
    raise AssertionError("no HANDLED_OUTPUT event for stage_batch")


def test_round_trip_writes_exact_keys_and_hands_over_stored_objects(
    s3_env: str, s3_client: Any, file_server: FileServer, batch: dict[str, Any], tmp_path: Path
) -> None:
    bucket = s3_env
    result = outputs_job.execute_in_process(run_config=_run_config(file_server, batch, tmp_path))
    assert result.success
    assert result.output_for_node("record") == _expected(bucket)

    store = S3OutputStore(s3_client, bucket)
    assert store.list_keys() == [
        f"{PREFIX}/_manifests/{result.run_id}/stage_batch/result.json",
        f"{PREFIX}/generations/1/a1/0.png",
        f"{PREFIX}/generations/1/a1/1.png",
        f"{PREFIX}/generations/2/a1/0.txt",
    ]
    for objs in _expected(bucket).values():
        for obj in objs:
            head = s3_client.head_object(Bucket=bucket, Key=obj["key"])
            assert head["ContentLength"] == obj["size"]
            assert head["Metadata"]["sha256"] == obj["sha256"]
            assert head["ContentType"] == obj["content_type"]
    # The temp files, and their folder, were a hand-off inside the step and are gone.
    assert list(tmp_path.iterdir()) == []

    metadata = _handled_output_metadata(result)
    assert metadata["count"] == 3
    assert metadata["generations"] == 2
    assert metadata["total_bytes"] == sum(
        o["size"] for objs in _expected(bucket).values() for o in objs
    )
    assert metadata["uris"] == [o["uri"] for objs in _expected(bucket).values() for o in objs]
    preview = metadata["preview"]
    assert preview.startswith(f"![{PREFIX}/generations/1/a1/0.png](http")
    link = preview[preview.index("(") + 1 : -1]
    with urllib.request.urlopen(link, timeout=5) as response:
        assert response.read() == png_bytes(color="red")
    assert metadata["first_object"] == link


def test_rerun_overwrites_the_same_keys(
    s3_env: str, s3_client: Any, file_server: FileServer, batch: dict[str, Any], tmp_path: Path
) -> None:
    first = outputs_job.execute_in_process(run_config=_run_config(file_server, batch, tmp_path))
    second = outputs_job.execute_in_process(run_config=_run_config(file_server, batch, tmp_path))
    assert first.success and second.success
    keys = S3OutputStore(s3_client, s3_env).list_keys()
    assert [k for k in keys if "/generations/" in k] == [
        f"{PREFIX}/generations/1/a1/0.png",
        f"{PREFIX}/generations/1/a1/1.png",
        f"{PREFIX}/generations/2/a1/0.txt",
    ]
    assert sorted(k for k in keys if "_manifests" in k) == sorted(
        f"{PREFIX}/_manifests/{r.run_id}/stage_batch/result.json" for r in (first, second)
    )
    assert second.output_for_node("record") == first.output_for_node("record")


def test_corrupted_staged_file_fails_without_writing_a_manifest(
    s3_env: str, s3_client: Any, file_server: FileServer, batch: dict[str, Any], tmp_path: Path
) -> None:
    result = outputs_job.execute_in_process(
        run_config=_run_config(file_server, batch, tmp_path, corrupt=True), raise_on_error=False
    )
    assert not result.success
    failure = result.get_step_failure_events()[0]
    assert failure.step_key == "stage_batch"
    assert "changed on disk" in str(failure.event_specific_data.error)  # type: ignore[union-attr]
    keys = S3OutputStore(s3_client, s3_env).list_keys()
    assert "out/generations/1/a1/0.png" not in keys
    assert not any("_manifests" in k for k in keys)
    assert list(tmp_path.iterdir()) == []  # temp files are removed even on failure


@pytest.mark.slow
def test_downstream_op_in_another_process_reads_from_s3(
    s3_env: str, file_server: FileServer, batch: dict[str, Any], tmp_path: Path
) -> None:
    """Multiprocess executor: each op runs in its own process; nothing is shared but S3."""
    staging = tmp_path / "staging"
    staging.mkdir()
    (tmp_path / "dagster").mkdir()
    with (
        instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance,
        execute_job(
            reconstructable(outputs_job),
            instance=instance,
            run_config=_run_config(file_server, batch, staging).to_config_dict(),
        ) as result,
    ):
        assert result.success
        assert result.output_for_node("record") == _expected(s3_env)
    assert list(staging.iterdir()) == []


def test_every_config_field_is_described() -> None:
    fields = GenerationOutputsIOManager.model_fields
    assert {"s3", "bucket", "prefix", "presign_expires_s", "upload_concurrency"} <= set(fields)
    assert all(f.description for f in fields.values())
