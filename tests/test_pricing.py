"""Prices turn into the right holds and charges, and a bad price table fails loudly.

Proves: the shipped table prices the emulator's models (pixel-sketch fixed 5, haiku-text metered
2 credits/s up to 30 s, hold 60); metered charges are ceil(seconds * rate) in exact decimal
arithmetic and capped at the hold; versioned references use the model's price unless the table
prices that version; unpriced models and malformed references are refused with clear messages;
``AI_HANDLER_PRICING_FILE`` replaces the table; malformed files raise ConfigError naming the file,
model and field.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ai_handler_dagster.pricing import UnpricedModel, load_pricing, parse_pricing
from ai_handler_dagster.settings import ConfigError


@pytest.fixture(autouse=True)
def _no_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AI_HANDLER_PRICING_FILE", raising=False)


def test_default_table_prices_the_emulator_models() -> None:
    book = load_pricing()
    sketch = book.price_for("demo/pixel-sketch")
    assert (sketch.hold_amount(), sketch.charge_for(12.3), sketch.charge_for(None)) == (5, 5, 5)
    haiku = book.price_for("demo/haiku-text")
    assert haiku.metered
    assert haiku.hold_amount() == 60
    assert haiku.describe() == "2 credits/s, at most 30 s (hold 60)"
    assert book.models() == ["demo/haiku-text", "demo/pixel-sketch"]


@pytest.mark.parametrize(
    ("seconds", "credits"),
    [(0.0, 0), (0.2, 1), (1.0, 2), (1.5, 3), (1.51, 4), (29.99, 60), (30.0, 60), (600.0, 60)],
)
def test_metered_charge_is_ceiling_capped_at_the_hold(seconds: float, credits: int) -> None:
    assert load_pricing().price_for("demo/haiku-text").charge_for(seconds) == credits


def test_metered_arithmetic_is_decimal() -> None:
    # In binary floating point 1.1 * 10 is 11.000000000000002, whose ceiling would be 12.
    book = parse_pricing('[models."a/b"]\ncredits_per_second = 10\nmax_seconds = 5\n')
    assert book.price_for("a/b").charge_for(1.1) == 11
    fractional = parse_pricing('[models."a/b"]\ncredits_per_second = 0.1\nmax_seconds = 35\n')
    assert fractional.price_for("a/b").hold_amount() == 4  # ceil(3.5)
    assert fractional.price_for("a/b").charge_for(0.3) == 1  # ceil(0.03)


def test_metered_charge_without_time_is_the_hold_and_bad_times_are_refused() -> None:
    haiku = load_pricing().price_for("demo/haiku-text")
    assert haiku.charge_for(None) == 60
    for bad in (-1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="predict_time"):
            haiku.charge_for(bad)


def test_versions_use_the_model_price_unless_priced_themselves() -> None:
    book = parse_pricing('[models."o/m"]\ncredits = 3\n[models."o/m:v2"]\ncredits = 9\n')
    assert book.price_for("o/m:v1").hold_amount() == 3
    assert book.price_for("o/m:v2").hold_amount() == 9
    assert load_pricing().price_for("demo/pixel-sketch:" + "a" * 64).hold_amount() == 5


def test_unpriced_and_malformed_models_are_refused() -> None:
    book = load_pricing()
    with pytest.raises(UnpricedModel, match=r"'demo/unknown' has no price in the default"):
        book.price_for("demo/unknown")
    for bad in ("pixel-sketch", "demo/", "/x", "a/b/c", "a/b:", "a b/c", "a/b:v 1", ""):
        with pytest.raises(ValueError, match="owner/name"):
            book.price_for(bad)


def test_env_file_replaces_the_default_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = tmp_path / "prices.toml"
    table.write_text('[models."acme/video"]\ncredits_per_second = 1.5\nmax_seconds = 7\n')
    monkeypatch.setenv("AI_HANDLER_PRICING_FILE", str(table))
    book = load_pricing()
    assert book.price_for("acme/video").hold_amount() == 11  # ceil(10.5)
    with pytest.raises(UnpricedModel, match=r"prices\.toml"):
        book.price_for("demo/pixel-sketch")
    # An explicit path wins over the variable.
    other = tmp_path / "other.toml"
    other.write_text('[models."x/y"]\ncredits = 1\n')
    assert load_pricing(other).models() == ["x/y"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not toml [", "not valid TOML"),
        ("", "no \\[models"),
        ('[prices."a/b"]\ncredits = 1\n', "unknown top-level keys"),
        ('[models."a-b"]\ncredits = 1\n', "model 'a-b'.*owner/name"),
        ('[models."a/b"]\ncredits = 0\n', "credits must be a whole number >= 1"),
        ('[models."a/b"]\ncredits = 2.5\n', "credits must be a whole number"),
        ('[models."a/b"]\ncredits = true\n', "credits must be a whole number"),
        ('[models."a/b"]\ncredit = 1\n', "unknown fields \\['credit'\\]"),
        ('[models."a/b"]\ncredits = 1\nmax_seconds = 3\n', "not both"),
        ('[models."a/b"]\ncredits_per_second = 2\n', "both credits_per_second and max_seconds"),
        (
            '[models."a/b"]\ncredits_per_second = -2\nmax_seconds = 3\n',
            "credits_per_second must be",
        ),
        (
            '[models."a/b"]\ncredits_per_second = 2\nmax_seconds = "3"\n',
            "max_seconds must be a number",
        ),
        ('[models."a/b"]\ncredits_per_second = 1e300\nmax_seconds = 1e300\n', "too large"),
        ('[models."a/b"]\ncredits = 1\nallow_empty_output = "yes"\n', "must be true or false"),
    ],
)
def test_malformed_tables_raise_config_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_pricing(path)
    assert "bad.toml" in str(info.value)


def test_only_models_that_say_so_may_return_nothing() -> None:
    book = parse_pricing(
        '[models."a/b"]\ncredits = 1\n'
        '[models."a/c"]\ncredits_per_second = 1\nmax_seconds = 2\nallow_empty_output = true\n'
    )
    assert book.price_for("a/b").allow_empty_output is False
    assert book.price_for("a/c").allow_empty_output is True


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read price table.*nope\.toml"):
        load_pricing(tmp_path / "nope.toml")
