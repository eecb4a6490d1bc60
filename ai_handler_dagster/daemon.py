"""Deprecated: the daemon entry point is ``python -m ai_handler_dagster.runtime.daemon``; this
name still starts it, with a warning."""

import sys

from ai_handler_dagster.runtime.daemon import main

if __name__ == "__main__":
    sys.stderr.write(
        "warning: python -m ai_handler_dagster.daemon is deprecated: use "
        "python -m ai_handler_dagster.runtime.daemon\n"
    )
    main()
