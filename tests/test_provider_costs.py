"""The provider's prices turn into exact costs, and a bad provider table fails loudly.

Proves: the shipped table prices what Replicate charges for the emulator's models (pixel-sketch
per image, haiku-text per token) and lists example hardware; per-second costs are the hardware's
rate times ``predict_time`` in exact decimals, for failed and canceled predictions too, rounded
up to a whole nano-USD once, and nothing for a prediction that never started; per-output costs
count the outputs the provider returned; per-token costs count the reported tokens; a missing
measure makes the cost unknown (None), not zero; margins are exact; the credit value setting is
validated; malformed provider tables (unknown field, mixed or missing kinds, unknown hardware,
bad numbers, sub-nano prices, a bad [hardware] table) raise ConfigError naming the model and
the key; a table without provider prices still loads (their costs are simply not kept).
"""

from __future__ import annotations

from decimal import Decimal

import pytest

from ai_handler_dagster import settings
from ai_handler_dagster.pricing import load_pricing, parse_pricing
from ai_handler_dagster.provider_costs import Usage, count_outputs, format_usd, margin_usd
from ai_handler_dagster.settings import ConfigError

CREDITS = '[models."a/b"]\ncredits = 5\n'


def _table(provider: str, hardware: str = "nvidia-t4 = 0.000225\n") -> str:
    return f'[hardware]\n{hardware}\n{CREDITS}[models."a/b".provider]\n{provider}'


def test_the_shipped_table_prices_the_demo_models_as_replicate_bills_them() -> None:
    book = load_pricing()
    sketch = book.price_for("demo/pixel-sketch").provider
    haiku = book.price_for("demo/haiku-text").provider
    assert sketch is not None and sketch.kind == "per_output"
    assert sketch.usd_per_output == Decimal("0.003")
    assert haiku is not None and haiku.kind == "per_token"
    # 2 images: USD 0.006 = 6,000,000 nano-USD.
    assert sketch.cost_nano(Usage.of("succeeded", ["u1", "u2"], {})) == 6_000_000
    # 7 input tokens at 0.05/M and 20 output tokens at 0.25/M: USD 0.00000535.
    metrics = {"input_token_count": 7, "output_token_count": 20}
    assert haiku.cost_nano(Usage.of("succeeded", ["x"], metrics)) == 5_350


def test_per_second_cost_is_exact_and_bills_failed_and_canceled_predictions() -> None:
    price = parse_pricing(_table('hardware = "nvidia-t4"\n')).price_for("a/b").provider
    assert price is not None and price.kind == "per_second"
    assert price.usd_per_second == Decimal("0.000225")
    # 1.1 s x 0.000225 = 0.0002475 exactly (binary floats would say 0.00024750000000000002).
    for status in ("succeeded", "failed", "canceled"):
        usage = Usage.of(status, None, {"predict_time": 1.1})
        assert price.cost_usd(usage) == Decimal("0.0002475")
        assert price.cost_nano(usage) == 247_500
    # A fraction of a nano-USD rounds up, once: 0.000225 x 0.0000001 s = 2.25e-11 USD -> 1.
    assert price.cost_nano(Usage.of("succeeded", None, {"predict_time": 1e-7})) == 1
    # No usable time: unknown, not free.
    for metrics in ({}, {"predict_time": None}, {"predict_time": -1.0}, {"predict_time": True}):
        assert price.cost_nano(Usage.of("failed", None, metrics)) is None
    # Canceled (or aborted) before it started: the provider ran, and billed, no seconds.
    assert price.cost_nano(Usage.of("canceled", None, {}, never_started=True)) == 0


def test_per_output_counts_what_the_provider_returned() -> None:
    price = parse_pricing(_table("usd_per_output = 0.003\n")).price_for("a/b").provider
    assert price is not None
    assert price.cost_nano(Usage.of("succeeded", ["a", "", None, "b"], {})) == 6_000_000
    assert price.cost_nano(Usage.of("succeeded", "https://x/1.png", {})) == 3_000_000
    assert price.cost_nano(Usage.of("failed", None, {})) == 0
    assert [count_outputs(v) for v in (None, "", [], {}, ["a"], "a", {"k": 1})] == [
        0,
        0,
        0,
        0,
        1,
        1,
        1,
    ]


def test_per_token_counts_reported_tokens_and_is_unknown_without_them() -> None:
    price = (
        parse_pricing(
            _table("usd_per_million_input_tokens = 3\nusd_per_million_output_tokens = 15\n")
        )
        .price_for("a/b")
        .provider
    )
    assert price is not None
    metrics = {"input_token_count": 1000, "output_token_count": 2000}
    # 1000 x 3/M + 2000 x 15/M = 0.003 + 0.03 USD.
    assert price.cost_usd(Usage.of("succeeded", [], metrics)) == Decimal("0.033")
    # A failed prediction that reported its input tokens is billed for them.
    assert price.cost_nano(Usage.of("failed", None, {"input_token_count": 1000})) == 3_000_000
    assert price.cost_nano(Usage.of("succeeded", ["x"], {"input_token_count": "9"})) is None


def test_margin_is_exact_and_unknown_without_a_cost() -> None:
    assert margin_usd(10, Decimal("0.01"), 6_000_000) == Decimal("0.094")
    assert margin_usd(0, Decimal("0.01"), 247_500) == Decimal("-0.0002475")
    assert margin_usd(10, Decimal("0.01"), None) is None
    assert format_usd(-247_500, nano=True) == "-0.000248"
    assert format_usd(None) == "-"


def test_credit_value_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AI_HANDLER_CREDIT_VALUE_USD", raising=False)
    assert settings.credit_value_usd() == Decimal("0.01")
    monkeypatch.setenv("AI_HANDLER_CREDIT_VALUE_USD", "0.0125")
    assert settings.credit_value_usd() == Decimal("0.0125")
    for bad in ("abc", "0", "-1", "NaN", "Infinity", "1001"):
        monkeypatch.setenv("AI_HANDLER_CREDIT_VALUE_USD", bad)
        with pytest.raises(ConfigError, match="AI_HANDLER_CREDIT_VALUE_USD"):
            settings.credit_value_usd()


def test_a_table_without_provider_prices_still_loads() -> None:
    assert parse_pricing(CREDITS).price_for("a/b").provider is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            _table("usd_per_image = 1\n"),
            r"model 'a/b': provider: unknown fields \['usd_per_image'\]",
        ),
        (
            _table('usd_per_output = 1\nhardware = "nvidia-t4"\n'),
            r"model 'a/b': provider: set exactly one kind",
        ),
        (
            _table("usd_per_million_input_tokens = 1\n"),
            r"model 'a/b': provider: a per_token provider price also needs "
            r"usd_per_million_output_tokens",
        ),
        (
            _table('hardware = "nvidia-h200"\n'),
            r"model 'a/b': provider: hardware 'nvidia-h200' is not in the \[hardware\] table "
            r"\(listed: nvidia-t4\)",
        ),
        (_table("usd_per_output = 0\n"), r"provider\.usd_per_output must be more than 0"),
        (_table("usd_per_output = -0.5\n"), r"provider\.usd_per_output must be more than 0"),
        (_table("usd_per_output = 1001\n"), r"provider\.usd_per_output must be more than 0"),
        (_table("usd_per_output = true\n"), r"provider\.usd_per_output must be a number"),
        (_table('usd_per_output = "lots"\n'), r"provider\.usd_per_output must be a number"),
        (_table("usd_per_output = nan\n"), r"provider\.usd_per_output must be a finite"),
        (
            _table("usd_per_output = 0.0000000001\n"),
            r"provider\.usd_per_output is finer than a nano-USD",
        ),
        (_table("usd_per_output = 1\n", "nvidia-t4 = 0\n"), r"hardware 'nvidia-t4' must be more"),
        (
            f"hardware = 1\n{CREDITS}",
            r"\[hardware\] must be a table of name = USD per second",
        ),
        (f'{CREDITS}provider = "cheap"\n', r"model 'a/b': provider must be a table"),
    ],
)
def test_malformed_provider_tables_are_refused(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_pricing(text, source="test table")
    assert "test table" in str(info.value)


def test_a_decimal_string_price_is_exact() -> None:
    price = parse_pricing(_table('usd_per_output = "0.0031"\n')).price_for("a/b").provider
    assert price is not None and price.usd_per_output == Decimal("0.0031")
