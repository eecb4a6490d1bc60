"""What the provider charges US for a prediction, in exact money.

Replicate's API reports neither the cost nor the hardware of a prediction, so the operator
keeps the provider's prices in the price table (``pricing.toml``): a ``[hardware]`` table of USD
per second for each hardware name, and per model a ``provider`` sub-table of exactly one kind:

- ``hardware = "nvidia-t4"``: per second of ``metrics.predict_time`` on that hardware (how
  Replicate bills models that run on hardware of their own, public and private alike);
- ``usd_per_output = P``: per output the prediction produced (official image models);
- ``usd_per_million_input_tokens = I`` and ``usd_per_million_output_tokens = O``: per token of
  ``metrics.input_token_count`` / ``output_token_count`` (official language models).

Money is integer nano-USD (10^-9 USD): every price Replicate lists (USD 0.000225 a second, USD
0.05 a million tokens) is a whole number of them, integers add up exactly in SQL on SQLite and
PostgreSQL alike (SQLite has no exact decimal column type), and a BigInteger holds up to
USD 9.2 billion. The cost of one prediction is computed in ``Decimal`` and rounded up to a
whole nano-USD once.

What a prediction that did not succeed costs: Replicate bills the time a failed or canceled
prediction ran, so a per-second price counts its ``predict_time`` whatever its status. A per
output price counts the outputs the provider returned (none, for a prediction that failed); a
per token price counts the tokens the provider reports. Outputs the provider produced but we
could not store (a refused download, an expired file) are billed by the provider all the same,
so they are counted. When the measure a price needs is missing (no ``predict_time``, no token
counts) the cost is unknown (``None``), never guessed; a prediction the provider says never
started (``started_at`` null) ran no seconds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from ai_handler_dagster.settings import ConfigError

__all__ = [
    "NANO_PER_USD",
    "HardwareTable",
    "ProviderPrice",
    "Usage",
    "format_usd",
    "margin_usd",
    "nano_to_usd",
    "parse_hardware",
    "parse_provider_price",
]

NANO_PER_USD = 10**9
#: Largest price accepted for one unit (a second, an output, a million tokens): USD 1000.
MAX_UNIT_USD = Decimal(1000)

#: The kinds of provider price, as ``ProviderPrice.kind`` names them.
PER_SECOND, PER_OUTPUT, PER_TOKEN = "per_second", "per_output", "per_token"
_KIND_FIELDS: dict[str, tuple[str, ...]] = {
    PER_SECOND: ("hardware",),
    PER_OUTPUT: ("usd_per_output",),
    PER_TOKEN: ("usd_per_million_input_tokens", "usd_per_million_output_tokens"),
}

#: Hardware name -> USD per second.
HardwareTable = Mapping[str, Decimal]


@dataclass(frozen=True)
class Usage:
    """What a finished prediction used, as the provider reported it."""

    status: str
    predict_time: float | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    #: Outputs the provider returned (non-empty items of ``output``).
    outputs: int = 0

    @classmethod
    def of(
        cls,
        status: str,
        output: Any,
        metrics: Mapping[str, Any] | None,
        *,
        never_started: bool = False,
    ) -> Usage:
        """The usage of a prediction from its status, ``output`` and ``metrics``.

        ``never_started``: the provider says it ended without running (canceled or aborted
        while queued): no seconds were billed, even though it reports no ``predict_time``.
        """
        metrics = metrics or {}
        raw = metrics.get("predict_time")
        seconds: float | None = 0.0 if never_started else None
        if isinstance(raw, int | float) and not isinstance(raw, bool):
            seconds = float(raw) if math.isfinite(raw) and raw >= 0 else None
        return cls(
            status=status,
            predict_time=seconds,
            input_tokens=_count(metrics.get("input_token_count")),
            output_tokens=_count(metrics.get("output_token_count")),
            outputs=count_outputs(output),
        )


def count_outputs(output: Any) -> int:
    """How many outputs a prediction's ``output`` holds: the non-empty items of a list, one for
    any other non-empty value, none for ``null`` or an empty value."""
    if output is None or output == "" or output == {}:
        return 0
    if isinstance(output, list):
        return sum(1 for item in output if item not in (None, "", {}, []))
    return 1


def _count(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


@dataclass(frozen=True)
class ProviderPrice:
    """What the provider charges for one model: per second of ``hardware`` (at
    ``usd_per_second``), ``usd_per_output``, or per million input/output tokens."""

    model: str
    hardware: str | None = None
    usd_per_second: Decimal | None = None
    usd_per_output: Decimal | None = None
    usd_per_million_input_tokens: Decimal | None = None
    usd_per_million_output_tokens: Decimal | None = None

    @property
    def kind(self) -> str:
        """``per_second``, ``per_output`` or ``per_token``."""
        if self.hardware is not None:
            return PER_SECOND
        if self.usd_per_output is not None:
            return PER_OUTPUT
        return PER_TOKEN

    def cost_usd(self, usage: Usage) -> Decimal | None:
        """The exact USD the provider bills for ``usage``; None when it lacks the measure."""
        kind = self.kind
        if kind == PER_SECOND:
            assert self.usd_per_second is not None
            if usage.predict_time is None:
                return None
            # repr() is the shortest decimal that round-trips: 1.1 s stays 1.1.
            return self.usd_per_second * Decimal(repr(usage.predict_time))
        if kind == PER_OUTPUT:
            assert self.usd_per_output is not None
            return self.usd_per_output * usage.outputs
        assert self.usd_per_million_input_tokens is not None
        assert self.usd_per_million_output_tokens is not None
        if usage.input_tokens is None and usage.output_tokens is None:
            return None
        spent = self.usd_per_million_input_tokens * (usage.input_tokens or 0)
        spent += self.usd_per_million_output_tokens * (usage.output_tokens or 0)
        return spent / Decimal(10**6)

    def cost_nano(self, usage: Usage) -> int | None:
        """``cost_usd`` in whole nano-USD, rounded up once; None when unknown."""
        usd = self.cost_usd(usage)
        if usd is None:
            return None
        return math.ceil(usd * NANO_PER_USD)

    def describe(self) -> str:
        """A one-line description, for the CLI and run metadata."""
        kind = self.kind
        if kind == PER_SECOND:
            return f"USD {self.usd_per_second}/s on {self.hardware}"
        if kind == PER_OUTPUT:
            return f"USD {self.usd_per_output} per output"
        return (
            f"USD {self.usd_per_million_input_tokens} per million input tokens, "
            f"{self.usd_per_million_output_tokens} per million output tokens"
        )


def margin_usd(credits: int, credit_value: Decimal, cost_nusd: int | None) -> Decimal | None:
    """What we kept, exactly: ``credits`` charged times the value of a credit, less what the
    provider charged (None when that cost is unknown)."""
    if cost_nusd is None:
        return None
    return credits * credit_value - nano_to_usd(cost_nusd)


def nano_to_usd(nano: int) -> Decimal:
    """Exact USD of a nano-USD amount."""
    return Decimal(nano) / NANO_PER_USD


def format_usd(amount: Decimal | int | None, *, nano: bool = False, places: int = 6) -> str:
    """``amount`` as text with ``places`` decimals (``nano``: the amount is nano-USD); ``-``
    for None. Display only: stored and summed amounts stay exact."""
    if amount is None:
        return "-"
    usd = nano_to_usd(int(amount)) if nano else Decimal(amount)
    return f"{usd:.{places}f}"


def parse_hardware(table: Any, source: str) -> dict[str, Decimal]:
    """The ``[hardware]`` table: hardware name -> USD per second (each > 0)."""
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: [hardware] must be a table of name = USD per second")
    rates: dict[str, Decimal] = {}
    for name, value in table.items():
        if not name.strip() or name != name.strip():
            raise ConfigError(f"{source}, hardware {name!r}: a hardware name needs no spaces")
        rates[name] = _usd(value, f"{source}, hardware {name!r}")
    return rates


def parse_provider_price(
    model: str, entry: Any, hardware: HardwareTable, where: str
) -> ProviderPrice:
    """A model's ``provider`` sub-table; ``ConfigError`` names the model and the key."""
    where = f"{where}: provider"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where} must be a table of fields, got {entry!r}")
    known = {name for names in _KIND_FIELDS.values() for name in names}
    unknown = set(entry) - known
    if unknown:
        raise ConfigError(
            f"{where}: unknown fields {sorted(unknown)}; use hardware (a name of the [hardware] "
            "table), or usd_per_output, or usd_per_million_input_tokens with "
            "usd_per_million_output_tokens"
        )
    kinds = [kind for kind, names in _KIND_FIELDS.items() if set(names) & set(entry)]
    if len(kinds) != 1:
        raise ConfigError(
            f"{where}: set exactly one kind of provider price (hardware, usd_per_output, or "
            f"the two usd_per_million_*_tokens), got fields {sorted(entry)}"
        )
    kind = kinds[0]
    missing = [name for name in _KIND_FIELDS[kind] if name not in entry]
    if missing:
        raise ConfigError(f"{where}: a {kind} provider price also needs {', '.join(missing)}")
    if kind == PER_SECOND:
        name = entry["hardware"]
        if not isinstance(name, str) or name not in hardware:
            listed = ", ".join(sorted(hardware)) or "none"
            raise ConfigError(
                f"{where}: hardware {name!r} is not in the [hardware] table (listed: {listed})"
            )
        return ProviderPrice(model=model, hardware=name, usd_per_second=hardware[name])
    if kind == PER_OUTPUT:
        return ProviderPrice(
            model=model, usd_per_output=_usd(entry["usd_per_output"], f"{where}.usd_per_output")
        )
    return ProviderPrice(
        model=model,
        usd_per_million_input_tokens=_usd(
            entry["usd_per_million_input_tokens"], f"{where}.usd_per_million_input_tokens"
        ),
        usd_per_million_output_tokens=_usd(
            entry["usd_per_million_output_tokens"], f"{where}.usd_per_million_output_tokens"
        ),
    )


def _usd(value: Any, what: str) -> Decimal:
    """A price in USD: a number > 0 and at most ``MAX_UNIT_USD``, exact to the nano-USD.

    A decimal string (``"0.000225"``) is accepted too, for prices a float would spell badly.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(f"{what} must be a number of USD, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{what} must be a finite number of USD, got {value!r}")
    try:
        usd = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    except ArithmeticError:
        raise ConfigError(f"{what} must be a number of USD, got {value!r}") from None
    if not usd.is_finite() or usd <= 0 or usd > MAX_UNIT_USD:
        raise ConfigError(
            f"{what} must be more than 0 and at most {MAX_UNIT_USD} USD, got {value!r}"
        )
    if (usd * NANO_PER_USD) != (usd * NANO_PER_USD).to_integral_value():
        raise ConfigError(f"{what} is finer than a nano-USD (10^-9), got {value!r}")
    return usd
