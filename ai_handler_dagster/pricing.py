"""What a generation costs, in credits, per model.

The default table is ``pricing.toml`` next to this file. Setting ``AI_HANDLER_PRICING_FILE`` to
another TOML file (same format, documented at the top of ``pricing.toml``) replaces that table.

Four kinds of price:

- fixed: ``credits = N`` per generation; hold and charge are both N;
- metered: ``credits_per_second = R`` of the prediction's ``metrics.predict_time``, with
  ``max_seconds = S``; the hold is ``ceil(R * S)`` and the charge ``ceil(R * seconds)``, capped at
  the hold. Arithmetic is decimal, so 1.1 s at 10 credits/s is 11 credits, not 12;
- per output: ``credits_per_output = N`` for each output stored; the input field
  ``outputs_field`` (default ``outputs_default``, at most ``outputs_max``) says how many the
  prediction may produce, and the hold is N times that;
- per token: ``credits_per_input_token`` and ``credits_per_output_token`` of the prediction's
  ``metrics.input_token_count`` / ``output_token_count``; the hold assumes ``max_input_tokens``
  input tokens and as many output tokens as the input field ``max_tokens_field`` allows (default
  ``max_tokens_default``, at most ``max_tokens_max``); the charge is ``ceil`` of the sum, capped
  at the hold.

The two counted kinds read the request's input because official models hide their versions and
schemas: the price table itself declares which field gives the count. A request whose count is
not a whole number from 1 to the declared maximum is refused (``input_problem``), so no hold is
ever larger than the table declares. A prediction that reports no usable count (no
``predict_time``, no token counts) is charged the hold.

A succeeded prediction with nothing to store is charged nothing and fails its generation
(``empty_output``), unless its price says ``allow_empty_output = true``.

Each model may also say what the provider charges US for it (a ``provider`` sub-table, with a
top-level ``[hardware]`` table of USD per second): see ``provider_costs.py``. It changes nothing
a user is charged; it is what run metadata and ``ai-handler usage`` compare the charges with.

A model is priced by ``owner/name``; a request for ``owner/name:version`` uses the price of that
exact version if the table has one, else the ``owner/name`` price. A deployment is priced by its
own key, ``deployment:owner/name``, never by the price of the model it runs (a team's deployment
runs on hardware of its choosing). A model without a price raises ``UnpricedModel``: nothing is
ever run for free by accident.
"""

from __future__ import annotations

import dataclasses
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
from ai_handler_dagster.provider_costs import (
    ProviderPrice,
    parse_hardware,
    parse_provider_price,
)
from ai_handler_dagster.settings import PRICING_FILE_VAR, ConfigError

__all__ = [
    "DEFAULT_PRICING_RESOURCE",
    "FIXED",
    "METERED",
    "PER_OUTPUT",
    "PER_TOKEN",
    "Price",
    "PriceBook",
    "UnpricedModel",
    "load_pricing",
    "parse_pricing",
]

DEFAULT_PRICING_RESOURCE = "pricing.toml"
#: Same ceiling as the ledger's largest amount: a price must be holdable.
MAX_CREDITS = 10**15

#: The kinds of price, as ``Price.kind`` names them.
FIXED, METERED, PER_OUTPUT, PER_TOKEN = "fixed", "metered", "per_output", "per_token"
#: The fields of each kind; a table sets the fields of exactly one (plus allow_empty_output).
_KIND_FIELDS: dict[str, tuple[str, ...]] = {
    FIXED: ("credits",),
    METERED: ("credits_per_second", "max_seconds"),
    PER_OUTPUT: ("credits_per_output", "outputs_field", "outputs_default", "outputs_max"),
    PER_TOKEN: (
        "credits_per_input_token",
        "credits_per_output_token",
        "max_tokens_field",
        "max_tokens_default",
        "max_tokens_max",
        "max_input_tokens",
    ),
}


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
    """The price of one model, of one kind (see the module docstring): fixed ``credits``,
    metered ``credits_per_second`` up to ``max_seconds``, ``credits_per_output`` or per token."""

    model: str
    credits: int | None = None
    credits_per_second: Decimal | None = None
    max_seconds: Decimal | None = None
    #: The model may succeed with nothing to store (and is charged for it).
    allow_empty_output: bool = False
    credits_per_output: int | None = None
    #: Per output: the input field that says how many outputs, its default and its maximum.
    outputs_field: str | None = None
    outputs_default: int | None = None
    outputs_max: int | None = None
    credits_per_input_token: Decimal | None = None
    credits_per_output_token: Decimal | None = None
    #: Per token: the input field that caps the output tokens, its default and its maximum.
    max_tokens_field: str | None = None
    max_tokens_default: int | None = None
    max_tokens_max: int | None = None
    #: Per token: the input tokens the hold assumes (the input's count is known only after).
    max_input_tokens: int | None = None
    #: What the provider charges us for this model (None: not kept in the table).
    provider: ProviderPrice | None = None

    @property
    def kind(self) -> str:
        """``fixed``, ``metered``, ``per_output`` or ``per_token``."""
        if self.credits is not None:
            return FIXED
        if self.credits_per_second is not None:
            return METERED
        if self.credits_per_output is not None:
            return PER_OUTPUT
        return PER_TOKEN

    @property
    def metered(self) -> bool:
        """True for a per-second price."""
        return self.kind == METERED

    def _count_field(self) -> tuple[str, int, int] | None:
        """The counted kinds' input field, its default and its maximum; None for the others."""
        if self.kind == PER_OUTPUT:
            assert self.outputs_field and self.outputs_default and self.outputs_max
            return self.outputs_field, self.outputs_default, self.outputs_max
        if self.kind == PER_TOKEN:
            assert self.max_tokens_field and self.max_tokens_default and self.max_tokens_max
            return self.max_tokens_field, self.max_tokens_default, self.max_tokens_max
        return None

    def input_problem(self, input: Mapping[str, Any]) -> str | None:
        """Why this price cannot hold for ``input``, or None: a count field that is not a
        whole number from 1 to the declared maximum. Fixed and metered prices accept any input.
        """
        counted = self._count_field()
        if counted is None:
            return None
        name, default, most = counted
        value = input.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
            return (
                f"input field {name!r} must be a whole number from 1 to {most} "
                f"(the price of {self.model} is counted on it), got {value!r}"
            )
        return None

    def _count(self, input: Mapping[str, Any]) -> int:
        problem = self.input_problem(input)
        if problem is not None:
            raise ValueError(problem)
        counted = self._count_field()
        assert counted is not None
        name, default, _ = counted
        value: int = input.get(name, default)
        return value

    def hold_amount(self, input: Mapping[str, Any]) -> int:
        """Credits to reserve before running ``input``: the fixed price, the metered maximum,
        the price of the most outputs the input asks for, or of the most tokens it allows.

        A count field out of range raises ``ValueError`` (see ``input_problem``).
        """
        kind = self.kind
        if kind == FIXED:
            assert self.credits is not None
            return self.credits
        if kind == METERED:
            assert self.credits_per_second is not None and self.max_seconds is not None
            return math.ceil(self.credits_per_second * self.max_seconds)
        if kind == PER_OUTPUT:
            assert self.credits_per_output is not None
            return self.credits_per_output * self._count(input)
        assert self.credits_per_input_token is not None
        assert self.credits_per_output_token is not None and self.max_input_tokens is not None
        return math.ceil(
            self.credits_per_input_token * self.max_input_tokens
            + self.credits_per_output_token * self._count(input)
        )

    def charge_for(
        self,
        predict_time: float | None = None,
        *,
        input: Mapping[str, Any],
        metrics: Mapping[str, Any] | None = None,
        stored_outputs: int | None = None,
    ) -> int:
        """Credits to capture for a prediction of ``input`` that succeeded, never more than the
        hold for ``input``.

        Fixed prices charge their credits. Metered prices charge ``ceil(rate * predict_time)``
        (a ``predict_time`` that is no duration raises ``ValueError``). Per output charges each
        of the ``stored_outputs``. Per token charges ``ceil`` of the rates times the ``metrics``
        ``input_token_count`` and ``output_token_count``. A missing time or count, or a token
        count that is not a whole number >= 0, charges the hold.
        """
        kind = self.kind
        if kind == FIXED:
            assert self.credits is not None
            return self.credits
        hold = self.hold_amount(input)
        if kind == METERED:
            assert self.credits_per_second is not None
            if predict_time is None:
                return hold
            if (
                isinstance(predict_time, bool)
                or not isinstance(predict_time, int | float)
                or not math.isfinite(predict_time)
                or predict_time < 0
            ):
                raise ValueError(f"predict_time must be a finite number >= 0, got {predict_time!r}")
            # repr() is the shortest decimal that round-trips: 1.1 stays 1.1, not
            # 1.100000000000000088.
            seconds = Decimal(repr(float(predict_time)))
            return min(math.ceil(self.credits_per_second * seconds), hold)
        if kind == PER_OUTPUT:
            assert self.credits_per_output is not None
            if not _is_count(stored_outputs):
                return hold
            assert stored_outputs is not None
            return min(self.credits_per_output * stored_outputs, hold)
        assert self.credits_per_input_token is not None
        assert self.credits_per_output_token is not None
        used_in = (metrics or {}).get("input_token_count")
        used_out = (metrics or {}).get("output_token_count")
        if not (_is_count(used_in) and _is_count(used_out)):
            return hold
        assert isinstance(used_in, int) and isinstance(used_out, int)
        cost = self.credits_per_input_token * used_in + self.credits_per_output_token * used_out
        return min(math.ceil(cost), hold)

    def describe(self) -> str:
        """A one-line human description, for the CLI and run metadata."""
        kind = self.kind
        if kind == FIXED:
            return f"{self.credits} credits per generation"
        if kind == METERED:
            return (
                f"{self.credits_per_second} credits/s, at most {self.max_seconds} s "
                f"(hold {self.hold_amount({})})"
            )
        if kind == PER_OUTPUT:
            return (
                f"{self.credits_per_output} credits per output, {self.outputs_field} "
                f"(default {self.outputs_default}, at most {self.outputs_max})"
            )
        return (
            f"{self.credits_per_input_token} credits per input token (at most "
            f"{self.max_input_tokens}), {self.credits_per_output_token} per output token, "
            f"{self.max_tokens_field} (default {self.max_tokens_default}, at most "
            f"{self.max_tokens_max})"
        )


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class PriceBook:
    """The price table: ``price_for(model_ref)`` answers what a model costs."""

    def __init__(self, prices: Mapping[str, Price], source: str) -> None:
        self._prices = dict(prices)
        self.source = source

    def price_for(self, model_ref: str) -> Price:
        """The price of ``owner/name[:version]`` or ``deployment:owner/name``;
        ``UnpricedModel`` if there is none.

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
    unknown = set(data) - {"models", "hardware"}
    if unknown:
        raise ConfigError(
            f"{source}: unknown top-level keys {sorted(unknown)}; expected [models] "
            "(and [hardware])"
        )
    hardware = parse_hardware(data.get("hardware", {}), source)
    models = data.get("models")
    if not isinstance(models, dict) or not models:
        raise ConfigError(f'{source}: no [models."owner/name"] tables')
    prices: dict[str, Price] = {}
    for key, entry in models.items():
        price = _parse_price(key, entry, source)
        if isinstance(entry, dict) and "provider" in entry:
            provider = parse_provider_price(
                key, entry["provider"], hardware, f"{source}, model {key!r}"
            )
            price = dataclasses.replace(price, provider=provider)
        prices[key] = price
    return PriceBook(prices, source)


def _parse_price(key: str, entry: Any, source: str) -> Price:
    where = f"{source}, model {key!r}"
    try:
        parse_model_ref(key)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a table of fields, got {entry!r}")
    # The provider's price is parsed by the caller; the credits are this function's.
    entry = {name: value for name, value in entry.items() if name != "provider"}
    known = {name for names in _KIND_FIELDS.values() for name in names} | {"allow_empty_output"}
    unknown = set(entry) - known
    if unknown:
        raise ConfigError(
            f"{where}: unknown fields {sorted(unknown)}; use credits, or credits_per_second "
            "with max_seconds, or credits_per_output with outputs_field, outputs_default and "
            "outputs_max, or credits_per_input_token and credits_per_output_token with "
            "max_tokens_field, max_tokens_default, max_tokens_max and max_input_tokens "
            "(and optionally allow_empty_output and a provider sub-table)"
        )
    allow_empty = entry.get("allow_empty_output", False)
    if not isinstance(allow_empty, bool):
        raise ConfigError(f"{where}: allow_empty_output must be true or false, got {allow_empty!r}")
    kinds = [kind for kind, names in _KIND_FIELDS.items() if set(names) & set(entry)]
    if len(kinds) > 1:
        fields = sorted(set(entry) - {"allow_empty_output"})
        raise ConfigError(
            f"{where}: fields {fields} mix kinds of price ({', '.join(kinds)}); set one kind"
        )
    if not kinds:
        raise ConfigError(f"{where}: set credits, or both credits_per_second and max_seconds")
    kind = kinds[0]
    missing = [name for name in _KIND_FIELDS[kind] if name not in entry]
    if missing:
        if kind == METERED:
            raise ConfigError(f"{where}: set credits, or both credits_per_second and max_seconds")
        raise ConfigError(f"{where}: a {kind} price also needs {', '.join(missing)}")
    if kind == FIXED:
        credits = entry["credits"]
        if (
            isinstance(credits, bool)
            or not isinstance(credits, int)
            or not 1 <= credits <= MAX_CREDITS
        ):
            raise ConfigError(f"{where}: credits must be a whole number >= 1, got {credits!r}")
        return Price(model=key, credits=credits, allow_empty_output=allow_empty)
    if kind == METERED:
        price = Price(
            model=key,
            credits_per_second=_positive_decimal(
                entry["credits_per_second"], f"{where}: credits_per_second"
            ),
            max_seconds=_positive_decimal(entry["max_seconds"], f"{where}: max_seconds"),
            allow_empty_output=allow_empty,
        )
        most: dict[str, Any] = {}
    elif kind == PER_OUTPUT:
        outputs_max = _whole(entry["outputs_max"], f"{where}: outputs_max")
        price = Price(
            model=key,
            credits_per_output=_whole(entry["credits_per_output"], f"{where}: credits_per_output"),
            outputs_field=_field_name(entry["outputs_field"], f"{where}: outputs_field"),
            outputs_default=_whole(
                entry["outputs_default"], f"{where}: outputs_default", most=outputs_max
            ),
            outputs_max=outputs_max,
            allow_empty_output=allow_empty,
        )
        most = {entry["outputs_field"]: outputs_max}
    else:
        tokens_max = _whole(entry["max_tokens_max"], f"{where}: max_tokens_max")
        price = Price(
            model=key,
            credits_per_input_token=_positive_decimal(
                entry["credits_per_input_token"], f"{where}: credits_per_input_token"
            ),
            credits_per_output_token=_positive_decimal(
                entry["credits_per_output_token"], f"{where}: credits_per_output_token"
            ),
            max_tokens_field=_field_name(entry["max_tokens_field"], f"{where}: max_tokens_field"),
            max_tokens_default=_whole(
                entry["max_tokens_default"], f"{where}: max_tokens_default", most=tokens_max
            ),
            max_tokens_max=tokens_max,
            max_input_tokens=_whole(entry["max_input_tokens"], f"{where}: max_input_tokens"),
            allow_empty_output=allow_empty,
        )
        most = {entry["max_tokens_field"]: tokens_max}
    # The largest hold any accepted input can ask for.
    largest = price.hold_amount(most)
    if largest > MAX_CREDITS:
        raise ConfigError(f"{where}: the hold ({largest} credits) is too large")
    return price


def _whole(value: Any, what: str, *, most: int = MAX_CREDITS) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        raise ConfigError(f"{what} must be a whole number from 1 to {most}, got {value!r}")
    return value


def _field_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip() or value != value.strip():
        raise ConfigError(f"{what} must be the name of an input field, got {value!r}")
    return value


def _positive_decimal(value: Any, what: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{what} must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{what} must be a finite number > 0, got {value!r}")
    return Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
