"""Value types passed between the download step, the IO manager and the database.

``StagedFile`` is an output waiting in a local temp file (it never leaves the step that made it);
``StoredObject`` is an output persisted in S3, the shape recorded in ``generations.outputs``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class StagedFile:
    """One output staged in a local temp file, with the facts checked while writing it."""

    path: Path
    content_type: str
    ext: str
    size: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class AttemptFiles:
    """The staged outputs of one generation attempt (stored under that attempt's own keys)."""

    attempt: int
    files: list[StagedFile]


@dataclasses.dataclass(frozen=True)
class StoredObject:
    """One output object in S3, with the size and checksum verified when it was written."""

    bucket: str
    key: str
    uri: str
    size: int
    sha256: str
    content_type: str

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the element shape of the ``generations.outputs`` column)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StoredObject:
        """Rebuild from ``to_json()`` output; unknown keys are ignored for forward compatibility."""
        return cls(
            bucket=str(data["bucket"]),
            key=str(data["key"]),
            uri=str(data["uri"]),
            size=int(data["size"]),
            sha256=str(data["sha256"]),
            content_type=str(data["content_type"]),
        )
