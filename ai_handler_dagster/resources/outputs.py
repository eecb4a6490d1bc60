"""Resource that says which output URLs may be downloaded, and how.

Production accepts only Replicate's delivery hosts over HTTPS. The embedded setup also accepts the
local emulator's own host (plain HTTP on loopback), and nothing else.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from dagster import ConfigurableResource
from pydantic import Field

from ai_handler_dagster.storage.download import DownloadPolicy, stage_outputs


class OutputPolicyResource(ConfigurableResource):
    """Rules for fetching a prediction's output files before they are stored in S3."""

    emulator_base_url: str | None = Field(
        default=None,
        description=(
            "Embedded setup only: base URL of the local Replicate emulator, whose host is then "
            "allowed (plain HTTP, loopback). Unset in production."
        ),
    )
    max_bytes: int = Field(
        default=256 * 1024 * 1024, description="Largest output file accepted, in bytes."
    )
    timeout_s: float = Field(default=60.0, description="Connect and read timeout per download.")

    def policy(self) -> DownloadPolicy:
        if self.emulator_base_url:
            base = DownloadPolicy.embedded(self.emulator_base_url)
        else:
            base = DownloadPolicy.production()
        return dataclasses.replace(base, max_bytes=self.max_bytes, timeout_s=self.timeout_s)

    def stage(self, output: Any, policy: DownloadPolicy, tmp_dir: str) -> list[Any]:
        """Download or write each item of a prediction's ``output`` into ``tmp_dir``."""
        return stage_outputs(output, policy, Path(tmp_dir))
