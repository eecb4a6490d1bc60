"""Deprecated: the run launcher is ``ai_handler_dagster.runtime.launcher``.

An instance folder written before the move names this module in its ``dagster.yaml``; it keeps
loading, with a warning, until ``ai-handler instance write DIR --force`` rewrites it.
"""

import warnings

from ai_handler_dagster.runtime.launcher import LocalRunLauncher

warnings.warn(
    "run_launcher module ai_handler_dagster.launcher is deprecated: it is "
    "ai_handler_dagster.runtime.launcher now (ai-handler instance write DIR --force)",
    FutureWarning,
    stacklevel=2,
)

__all__ = ["LocalRunLauncher"]
