"""The embedded stack's own guards.

Regression: two stacks in one state folder (``ai-handler dev`` and ``ai-handler demo``) shared the
app database, so one stack's daemon claimed the other's requests and stored their outputs in its
own S3; a second stack on a folder now stops with a clear error and the first is unaffected.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ai_handler_dagster.devstack.stack import Stack, StackConfig
from ai_handler_dagster.settings import ConfigError


def test_one_stack_per_state_folder(tmp_path: Path) -> None:
    first = Stack(StackConfig(state_dir=tmp_path))
    first._prepare()
    try:
        second = Stack(StackConfig(state_dir=tmp_path))
        with pytest.raises(ConfigError, match="another embedded stack"):
            second._prepare()
        # A different folder is fine.
        other = Stack(StackConfig(state_dir=tmp_path / "other"))
        other._prepare()
        other.stop()
    finally:
        first.stop()
    # Once the first one stopped, the folder is free again.
    third = Stack(StackConfig(state_dir=tmp_path))
    third._prepare()
    third.stop()
