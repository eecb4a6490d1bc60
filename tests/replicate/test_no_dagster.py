"""The Replicate package and the retry policy are plain Python: importing any of their modules
imports no Dagster."""

from __future__ import annotations

import subprocess
import sys

MODULES = [
    "ai_handler_dagster.replicate",
    "ai_handler_dagster.replicate.snapshot",
    "ai_handler_dagster.replicate.failures",
    "ai_handler_dagster.replicate.client",
    "ai_handler_dagster.replicate.waiting",
    "ai_handler_dagster.retries",
]


def test_no_module_of_the_package_imports_dagster() -> None:
    code = (
        f"import {', '.join(MODULES)}; import sys; "
        "loaded = sorted(m for m in sys.modules if m == 'dagster' or m.startswith('dagster.')); "
        "assert not loaded, loaded"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
