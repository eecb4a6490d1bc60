"""A Replicate-compatible HTTP server for offline development, tests and benchmarks.

The unmodified ``replicate`` client talks to it through ``base_url``::

    from ai_handler_dagster.devstack.emulator import EmulatorConfig, Faults, start_emulator

    with start_emulator(EmulatorConfig(latency_s=0.2, faults=Faults(failure_rate=0.1))) as emu:
        client = replicate.Client(api_token=emu.token, base_url=emu.base_url)
        prediction = client.models.predictions.create(
            model="demo/pixel-sketch", input={"prompt": "a red fox"}
        )

Its models do real work (``demo/pixel-sketch`` renders PNGs, ``demo/haiku-text`` writes text),
on emulated hardware with a concurrency cap, and it injects faults on demand. Other processes
start it with ``python -m ai_handler_dagster.devstack.emulator`` and steer it through
``/_emulator/*`` (see :class:`EmulatorControl`).
"""

from .config import DEFAULT_TOKEN, EmulatorConfig, Faults
from .control import EmulatorControl, read_port_file
from .engine import FAIL_TRIGGER, STUCK_TRIGGER
from .models import MODELS, render_sketch
from .server import EmulatorHandle, start_emulator
from .webhooks import sign as sign_webhook

__all__ = [
    "DEFAULT_TOKEN",
    "FAIL_TRIGGER",
    "MODELS",
    "STUCK_TRIGGER",
    "EmulatorConfig",
    "EmulatorControl",
    "EmulatorHandle",
    "Faults",
    "read_port_file",
    "render_sketch",
    "sign_webhook",
    "start_emulator",
]
