"""Output storage: safe download of prediction outputs, S3 writes and the Dagster IO manager.

* :mod:`.download` - ``DownloadPolicy``, ``download``, ``outputs_from_prediction``,
  ``stage_outputs``: fetch outputs under an allow-list, address checks, size cap and sniffing;
* :mod:`.s3` - ``S3OutputStore``: deterministic keys, verified uploads, presigned links;
* :mod:`.io_manager` - ``GenerationOutputsIOManager``: stores staged files, hands downstream ops
  ``StoredObject`` lists through a manifest in S3.
"""

from ai_handler_dagster.storage.download import (
    DownloadedFile,
    DownloadPolicy,
    OutputItem,
    download,
    outputs_from_prediction,
    stage_outputs,
)
from ai_handler_dagster.storage.io_manager import GenerationOutputsIOManager
from ai_handler_dagster.storage.objects import AttemptFiles, StagedFile, StoredObject
from ai_handler_dagster.storage.s3 import S3OutputStore, manifest_key, output_key

__all__ = [
    "AttemptFiles",
    "DownloadPolicy",
    "DownloadedFile",
    "GenerationOutputsIOManager",
    "OutputItem",
    "S3OutputStore",
    "StagedFile",
    "StoredObject",
    "download",
    "manifest_key",
    "output_key",
    "outputs_from_prediction",
    "stage_outputs",
]
