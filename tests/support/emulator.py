"""The Replicate emulator in tests: fast settings and official clients pointed at one."""

from __future__ import annotations

import ssl
from typing import Any

import httpx
import replicate

from ai_handler_dagster.devstack.emulator import EmulatorConfig, EmulatorHandle

# Short latency: tests exercise the lifecycle, not the clock.
FAST = EmulatorConfig(latency_s=0.1, concurrency=8)

# Every httpx client loads the CA bundle (about 0.1 s on a busy machine), although these tests
# only speak plain HTTP on loopback; one shared context keeps client creation free.
TLS = ssl.create_default_context()


def client_for(
    handle: EmulatorHandle, *, token: str | None = None, **kwargs: Any
) -> replicate.Client:
    """The official client pointed at ``handle`` (no environment proxies), polling fast."""
    client = replicate.Client(
        api_token=token or handle.token,
        base_url=handle.base_url,
        trust_env=False,
        transport=httpx.HTTPTransport(verify=TLS),
        **kwargs,
    )
    client.poll_interval = 0.02  # Prediction.wait() sleeps this long between gets
    return client
