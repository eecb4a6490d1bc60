"""What a generation costs, in credits, per model.

The default table is ``pricing.toml`` next to this file. Setting ``AI_HANDLER_PRICING_FILE`` to
another TOML file (same format, documented at the top of ``pricing.toml``) replaces that table.

Two kinds of price:

- fixed: ``credits = N`` per generation; hold and charge are both N;
- metered: ``credits_per_second = R`` of the prediction's ``metrics.predict_time``, with
  ``max_seconds = S``; the hold is ``ceil(R * S)`` and the charge ``ceil(R * seconds)``, capped at
  the hold. Arithmetic is decimal, so 1.1 s at 10 credits/s is 11 credits, not 12.

A succeeded prediction with nothing to store is charged nothing and fails its generation
(``empty_output``), unless its price says ``allow_empty_output = true``.

A model is priced by ``owner/name``; a request for ``owner/name:version`` uses the price of that
exact version if the table has one, else the ``owner/name`` price. A model without a price raises
``UnpricedModel``: nothing is ever run for free by accident.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any

from ai_handler_dagster.domain import parse_model_ref
from ai_handler_dagster.errors import AiHandlerError
from ai_handler_dagster.settings import PRICING_FILE_VAR, ConfigError

__all__ = [
    "DEFAULT_PRICING_RESOURCE",
    "Price",
    "PriceBook",
    "UnpricedModel",
    "load_pricing",
    "parse_pricing",
]

DEFAULT_PRICING_RESOURCE = "pricing.toml"
#: Same ceiling as the ledger's largest amount: a price must be holdable.
MAX_CREDITS = 10**15


class UnpricedModel(AiHandlerError, LookupError):
    """The price table has no entry for the model."""

    def __init__(self, model_ref: str, source: str) -> None:
        super().__init__(
            f"model {model_ref!r} has no price in {source}; add it to the price table "
            f"(set {PRICING_FILE_VAR} to use your own table)"
        )
        self.model_ref = model_ref
        self.source = source


@dataclass(frozen=True)
class Price:
    """The price of one model: fixed ``credits``, or metered ``credits_per_second`` up to
    ``max_seconds``."""

    model: str
    credits: int | None = None
    credits_per_second: Decimal | None = None
    max_seconds: Decimal | None = None
    #: The model may succeed with nothing to store (and is charged for it).
    allow_empty_output: bool = False

    @property
    def metered(self) -> bool:
        """True for a per-second price."""
        return self.credits is None

    def hold_amount(self) -> int:
        """Credits to reserve before running: the fixed price, or the metered maximum."""
        if self.credits is not None:
            return self.credits
        assert self.credits_per_second is not None and self.max_seconds is not None
        return math.ceil(self.credits_per_second * self.max_seconds)

    def charge_for(self, predict_time: float | None) -> int:
        """Credits to capture for a prediction that ran ``predict_time`` seconds.

        Fixed prices ignore the time. Metered prices charge ``ceil(rate * seconds)``, never more
        than the hold; without a reported time the hold is charged.
        """
        if self.credits is not None:
            return self.credits
        if predict_time is None:
            return self.hold_amount()
        if (
            isinstance(predict_time, bool)
            or not isinstance(predict_time, int | float)
            or not math.isfinite(predict_time)
            or predict_time < 0
        ):
            raise ValueError(f"predict_time must be a finite number >= 0, got {predict_time!r}")
        assert self.credits_per_second is not None
        # repr() is the shortest decimal that round-trips: 1.1 stays 1.1, not 1.100000000000000088.
        seconds = Decimal(repr(float(predict_time)))
        return min(math.ceil(self.credits_per_second * seconds), self.hold_amount())

    def describe(self) -> str:
        """A one-line human description, for the CLI and run metadata."""
        if self.credits is not None:
            return f"{self.credits} credits per generation"
        return (
            f"{self.credits_per_second} credits/s, at most {self.max_seconds} s "
            f"(hold {self.hold_amount()})"
        )


class PriceBook:
    """The price table: ``price_for(model_ref)`` answers what a model costs."""

    def __init__(self, prices: Mapping[str, Price], source: str) -> None:
        self._prices = dict(prices)
        self.source = source

    def price_for(self, model_ref: str) -> Price:
        """The price of ``owner/name[:version]``; ``UnpricedModel`` if there is none.

        A malformed reference raises ``ValueError``.
        """
        ref = parse_model_ref(model_ref)
        found = self._prices.get(str(ref)) or self._prices.get(ref.base)
        if found is None:
            raise UnpricedModel(model_ref, self.source)
        return found

    def find(self, model_ref: str) -> Price | None:
        """The price of ``model_ref``, or None when it has none or is malformed."""
        try:
            return self.price_for(model_ref)
        except (UnpricedModel, ValueError):
            return None

    def models(self) -> list[str]:
        """Every priced model key, sorted."""
        return sorted(self._prices)

    def __len__(self) -> int:
        return len(self._prices)

    def __repr__(self) -> str:
        return f"PriceBook({len(self)} models from {self.source})"


def load_pricing(path: str | os.PathLike[str] | None = None) -> PriceBook:
    """Load the price table from ``path``, else ``AI_HANDLER_PRICING_FILE``, else the default.

    Any problem in the file raises ``ConfigError`` naming the file, the model and the field.
    """
    if path is None:
        path = os.environ.get(PRICING_FILE_VAR) or None
    if path is None:
        resource = resources.files("ai_handler_dagster") / DEFAULT_PRICING_RESOURCE
        return parse_pricing(resource.read_text(encoding="utf-8"), source="the default price table")
    file = Path(path).expanduser()
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read price table {str(file)!r}: {exc.strerror or exc}") from exc
    return parse_pricing(text, source=f"price table {str(file)!r}")


def parse_pricing(text: str, *, source: str = "price table") -> PriceBook:
    """Parse the TOML text of a price table (format: see ``pricing.toml``)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source} is not valid TOML: {exc}") from exc
    unknown = set(data) - {"models"}
    if unknown:
        raise ConfigError(f"{source}: unknown top-level keys {sorted(unknown)}; expected [models]")
    models = data.get("models")
    if not isinstance(models, dict) or not models:
        raise ConfigError(f'{source}: no [models."owner/name"] tables')
    prices: dict[str, Price] = {}
    for key, entry in models.items():
        prices[key] = _parse_price(key, entry, source)
    return PriceBook(prices, source)


def _parse_price(key: str, entry: Any, source: str) -> Price:
    where = f"{source}, model {key!r}"
    try:
        parse_model_ref(key)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a table of fields, got {entry!r}")
    unknown = set(entry) - {"credits", "credits_per_second", "max_seconds", "allow_empty_output"}
    if unknown:
        raise ConfigError(
            f"{where}: unknown fields {sorted(unknown)}; use credits, or credits_per_second "
            "with max_seconds (and optionally allow_empty_output)"
        )
    allow_empty = entry.get("allow_empty_output", False)
    if not isinstance(allow_empty, bool):
        raise ConfigError(f"{where}: allow_empty_output must be true or false, got {allow_empty!r}")
    if "credits" in entry:
        if "credits_per_second" in entry or "max_seconds" in entry:
            raise ConfigError(f"{where}: set either credits or credits_per_second, not both")
        credits = entry["credits"]
        if (
            isinstance(credits, bool)
            or not isinstance(credits, int)
            or not 1 <= credits <= MAX_CREDITS
        ):
            raise ConfigError(f"{where}: credits must be a whole number >= 1, got {credits!r}")
        return Price(model=key, credits=credits, allow_empty_output=allow_empty)
    if "credits_per_second" not in entry or "max_seconds" not in entry:
        raise ConfigError(f"{where}: set credits, or both credits_per_second and max_seconds")
    rate = _positive_decimal(entry["credits_per_second"], f"{where}: credits_per_second")
    limit = _positive_decimal(entry["max_seconds"], f"{where}: max_seconds")
    price = Price(
        model=key, credits_per_second=rate, max_seconds=limit, allow_empty_output=allow_empty
    )
    if price.hold_amount() > MAX_CREDITS:
        raise ConfigError(f"{where}: the hold ({price.hold_amount()} credits) is too large")
    return price


def _positive_decimal(value: Any, what: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{what} must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{what} must be a finite number > 0, got {value!r}")
    return Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
