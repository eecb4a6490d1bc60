"""Steering an emulator that runs in another process, over its ``/_emulator`` endpoints."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

from .config import EmulatorConfig, Faults


class EmulatorControl:
    """The ``EmulatorHandle`` controls, for an emulator reached only by URL."""

    def __init__(self, base_url: str, *, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        # trust_env=False: an HTTP proxy from the environment must not intercept local calls.
        self._client = httpx.Client(base_url=self.base_url, timeout=timeout, trust_env=False)

    def stats(self) -> dict[str, Any]:
        """``GET /_emulator/stats``."""
        return self._call("GET", "/_emulator/stats")

    def predictions(self) -> list[dict[str, Any]]:
        """``GET /_emulator/predictions``."""
        return self._call("GET", "/_emulator/predictions")

    def config(self) -> dict[str, Any]:
        """``GET /_emulator/config``."""
        return self._call("GET", "/_emulator/config")

    def configure(self, **changes: Any) -> dict[str, Any]:
        """``POST /_emulator/config``; ``faults`` may be a :class:`Faults` or a partial dict."""
        faults = changes.get("faults")
        if isinstance(faults, Faults):
            changes["faults"] = EmulatorConfig(faults=faults).to_json()["faults"]
        return self._call("POST", "/_emulator/config", json=changes)

    def web_prediction(self, model: str, input: dict[str, Any]) -> dict[str, Any]:
        """``POST /_emulator/web_predictions``: a prediction made on the website."""
        return self._call(
            "POST", "/_emulator/web_predictions", json={"model": model, "input": input}
        )

    def expire_outputs(self, prediction_ids: list[str] | None = None) -> int:
        """``POST /_emulator/expire``: delete outputs now; returns how many were removed."""
        body = {} if prediction_ids is None else {"prediction_ids": prediction_ids}
        return int(self._call("POST", "/_emulator/expire", json=body)["removed"])

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the emulator answers its health check."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._call("GET", "/_emulator/health")
                return
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def close(self) -> None:
        """Close the HTTP connections."""
        self._client.close()

    def __enter__(self) -> EmulatorControl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._client.request(method, path, **kwargs)
        response.raise_for_status()
        return response.json()


def read_port_file(path: str | Path, timeout: float = 10.0) -> int:
    """Wait for the ``--port-file`` of a starting emulator process and return the port."""
    path = Path(path)
    deadline = time.monotonic() + timeout
    while True:
        try:
            text = path.read_text().strip()
            if text:
                return int(text)
        except FileNotFoundError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"no port written to {path} within {timeout}s")
        time.sleep(0.02)
