"""The Replicate client tests' shared parts: the model they create, and readings of the emulator."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from ai_handler_dagster.devstack.emulator import Faults
from ai_handler_dagster.replicate.client import ReplicateClient

MakeClient = Callable[..., ReplicateClient]
IMAGE = "demo/pixel-sketch"
SMALL = {"width": 64, "height": 64}


def emulated_by_id(handle: Any) -> dict[str, dict[str, Any]]:
    return {p["id"]: p for p in handle.predictions()}


def lift_after_first(handle: Any, counter: str) -> threading.Thread:
    """A started thread that turns the emulator's faults off once ``counter`` counts one."""

    def lift() -> None:
        deadline = time.monotonic() + 10
        while handle.stats()[counter] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        handle.configure(faults=Faults())

    lifter = threading.Thread(target=lift)
    lifter.start()
    return lifter


def requests_to(handle: Any, route_fragment: str) -> int:
    return sum(n for route, n in handle.stats()["requests"].items() if route_fragment in route)
