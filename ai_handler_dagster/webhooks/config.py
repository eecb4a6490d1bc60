"""Settings of the webhook route (``POST /webhooks/replicate`` of ``ai-handler serve``) and of
the steps that ask Replicate for webhooks.

Read when called, never at import time. The secret is read here and nowhere else; it is never
logged, printed or put into run config.
"""

from __future__ import annotations

import base64
import binascii
import os
from urllib.parse import urlsplit

from ai_handler_dagster.settings import ConfigError

#: The ``whsec_...`` signing secret (``GET /v1/webhooks/default/secret`` on Replicate).
SECRET_VAR = "AI_HANDLER_WEBHOOK_SECRET"
#: Public URL of the service's webhook route, given to Replicate as ``webhook`` on every create
#: (e.g. ``https://hooks.example.com/webhooks/replicate``). Unset: no webhooks, polling only.
URL_VAR = "AI_HANDLER_WEBHOOK_URL"


def webhook_secret() -> str:
    """The signing secret from ``AI_HANDLER_WEBHOOK_SECRET``.

    Checked strictly here: ``standardwebhooks`` decodes leniently (it drops what is not base64),
    so a mistyped secret would otherwise refuse every delivery as a bad signature.

    Raises:
        ConfigError: it is unset or not ``whsec_`` followed by base64.
    """
    secret = os.environ.get(SECRET_VAR, "").strip()
    if not secret:
        raise ConfigError(
            f"{SECRET_VAR} must be set to the webhook signing secret "
            "(GET /v1/webhooks/default/secret on Replicate)"
        )
    try:
        key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if not key:
        # The message names the problem, never the value.
        raise ConfigError(f"{SECRET_VAR} is not 'whsec_' followed by base64")
    return secret


def public_webhook_url() -> str | None:
    """The webhook URL to send with creates (``AI_HANDLER_WEBHOOK_URL``), or None if unset.

    Raises:
        ConfigError: it is set but not an absolute http(s) URL.
    """
    raw = os.environ.get(URL_VAR, "").strip()
    if not raw:
        return None
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{URL_VAR}={raw!r} is not an absolute http(s) URL")
    return raw


def fetch_secret(base_url: str, api_token: str, *, timeout_s: float = 10.0) -> str:
    """The account's signing secret from ``GET /v1/webhooks/default/secret``.

    For the embedded stack (the emulator answers it like Replicate) and for setup scripts.
    """
    import httpx
    import replicate

    client = replicate.Client(
        api_token=api_token,
        base_url=base_url,
        timeout=httpx.Timeout(timeout_s),
        trust_env=False,
    )
    return client.webhooks.default.secret().key
