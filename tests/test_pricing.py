"""Prices turn into the right holds and charges, and a bad price table fails loudly.

Proves: the shipped table prices the emulator's models (pixel-sketch 5 per image, haiku-text per
token, hold 60 with the default max_tokens); metered charges are ceil(seconds * rate) in exact
decimal arithmetic and capped at the hold; per-output holds are the rate times the outputs the
input asks for and charges count the outputs stored; per-token holds cover the input-token cap and
the input's max_tokens, and charges are the ceiling of the reported counts (the hold when a count
is missing or malformed), never above the hold; a count field out of its declared range is
refused; versioned references use the model's price unless the table prices that version;
unpriced models and malformed references are refused with clear messages;
``AI_HANDLER_PRICING_FILE`` replaces the table; malformed files (each kind, mixed kinds) raise
ConfigError naming the file, model and field.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ai_handler_dagster.pricing import UnpricedModel, load_pricing, parse_pricing
from ai_handler_dagster.settings import ConfigError

#: The two older kinds: 5 credits per generation, and 2 credits/s up to 30 s (hold 60).
METERED = parse_pricing(
    '[models."a/fixed"]\ncredits = 5\n'
    '[models."a/metered"]\ncredits_per_second = 2\nmax_seconds = 30\n'
)


@pytest.fixture(autouse=True)
def _no_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AI_HANDLER_PRICING_FILE", raising=False)


def test_default_table_prices_the_emulator_models() -> None:
    book = load_pricing()
    sketch = book.price_for("demo/pixel-sketch")
    assert sketch.kind == "per_output"
    assert [sketch.hold_amount({"num_outputs": n}) for n in (1, 2, 4)] == [5, 10, 20]
    assert sketch.hold_amount({}) == 5
    assert sketch.charge_for(12.3, input={"num_outputs": 2}, stored_outputs=2) == 10
    haiku = book.price_for("demo/haiku-text")
    assert haiku.kind == "per_token"
    assert haiku.hold_amount({}) == 60  # ceil(0.02 * 1000 + 0.625 * 64)
    assert haiku.hold_amount({"max_tokens": 512}) == 340
    counts = {"input_token_count": 6, "output_token_count": 10, "predict_time": 1.2}
    assert haiku.charge_for(1.2, input={}, metrics=counts) == 7  # ceil(0.12 + 6.25)
    assert book.models() == ["demo/haiku-text", "demo/pixel-sketch"]


@pytest.mark.parametrize(
    ("seconds", "credits"),
    [(0.0, 0), (0.2, 1), (1.0, 2), (1.5, 3), (1.51, 4), (29.99, 60), (30.0, 60), (600.0, 60)],
)
def test_metered_charge_is_ceiling_capped_at_the_hold(seconds: float, credits: int) -> None:
    assert METERED.price_for("a/metered").charge_for(seconds, input={}) == credits


def test_metered_arithmetic_is_decimal() -> None:
    # In binary floating point 1.1 * 10 is 11.000000000000002, whose ceiling would be 12.
    book = parse_pricing('[models."a/b"]\ncredits_per_second = 10\nmax_seconds = 5\n')
    assert book.price_for("a/b").charge_for(1.1, input={}) == 11
    fractional = parse_pricing('[models."a/b"]\ncredits_per_second = 0.1\nmax_seconds = 35\n')
    assert fractional.price_for("a/b").hold_amount({}) == 4  # ceil(3.5)
    assert fractional.price_for("a/b").charge_for(0.3, input={}) == 1  # ceil(0.03)


def test_metered_charge_without_time_is_the_hold_and_bad_times_are_refused() -> None:
    haiku = METERED.price_for("a/metered")
    assert haiku.metered and haiku.describe() == "2 credits/s, at most 30 s (hold 60)"
    assert haiku.charge_for(None, input={}) == 60
    for bad in (-1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="predict_time"):
            haiku.charge_for(bad, input={})


def test_versions_use_the_model_price_unless_priced_themselves() -> None:
    book = parse_pricing('[models."o/m"]\ncredits = 3\n[models."o/m:v2"]\ncredits = 9\n')
    assert book.price_for("o/m:v1").hold_amount({}) == 3
    assert book.price_for("o/m:v2").hold_amount({}) == 9
    assert load_pricing().price_for("demo/pixel-sketch:" + "a" * 64).hold_amount({}) == 5


def test_a_deployment_has_its_own_price_never_its_models() -> None:
    book = parse_pricing(
        '[models."acme/sketcher"]\ncredits = 3\n'
        '[models."deployment:acme/sketcher"]\ncredits_per_second = 2\nmax_seconds = 10\n'
    )
    assert book.price_for("deployment:acme/sketcher").hold_amount({}) == 20
    assert book.price_for("acme/sketcher").hold_amount({}) == 3
    # A deployment without a price of its own is unpriced, whatever its model costs.
    only_model = parse_pricing('[models."acme/sketcher"]\ncredits = 3\n')
    with pytest.raises(UnpricedModel, match="'deployment:acme/sketcher' has no price"):
        only_model.price_for("deployment:acme/sketcher")
    assert only_model.find("deployment:acme/sketcher") is None


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
    assert book.price_for("acme/video").hold_amount({}) == 11  # ceil(10.5)
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
        ('[models."a/b"]\ncredits = 1\nmax_seconds = 3\n', "mix kinds of price"),
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


# --- per output and per token ------------------------------------------------------------------

PER_OUTPUT = """
[models."img/multi"]
credits_per_output = 5
outputs_field = "num_outputs"
outputs_default = 1
outputs_max = 4
"""
PER_TOKEN = """
[models."llm/chat"]
credits_per_input_token = 0.01
credits_per_output_token = 0.5
max_tokens_field = "max_tokens"
max_tokens_default = 64
max_tokens_max = 512
max_input_tokens = 1000
"""


def test_per_output_and_per_token_tables_parse() -> None:
    book = parse_pricing(PER_OUTPUT + PER_TOKEN)
    image, chat = book.price_for("img/multi"), book.price_for("llm/chat")
    assert (image.kind, image.outputs_field, image.outputs_default, image.outputs_max) == (
        "per_output",
        "num_outputs",
        1,
        4,
    )
    assert image.describe() == "5 credits per output, num_outputs (default 1, at most 4)"
    assert chat.kind == "per_token" and not chat.metered
    # Fractional rates are exact decimals, not binary floats.
    assert (str(chat.credits_per_input_token), str(chat.credits_per_output_token)) == (
        "0.01",
        "0.5",
    )
    assert (chat.max_tokens_field, chat.max_tokens_default, chat.max_tokens_max) == (
        "max_tokens",
        64,
        512,
    )
    assert chat.max_input_tokens == 1000


@pytest.mark.parametrize(
    ("input", "hold"),
    [({}, 5), ({"num_outputs": 1}, 5), ({"num_outputs": 3}, 15), ({"num_outputs": 4}, 20)],
)
def test_per_output_hold_is_the_rate_times_the_outputs_asked(input: dict, hold: int) -> None:
    price = parse_pricing(PER_OUTPUT).price_for("img/multi")
    assert price.input_problem(input) is None
    assert price.hold_amount(input) == hold


@pytest.mark.parametrize(
    ("input", "hold"),
    [
        ({}, 42),  # ceil(0.01 * 1000 + 0.5 * 64)
        ({"max_tokens": 1}, 11),  # ceil(10 + 0.5)
        ({"max_tokens": 511}, 266),  # ceil(10 + 255.5)
        ({"max_tokens": 512}, 266),
    ],
)
def test_per_token_hold_covers_the_input_cap_and_the_most_output_tokens(
    input: dict, hold: int
) -> None:
    assert parse_pricing(PER_TOKEN).price_for("llm/chat").hold_amount(input) == hold


@pytest.mark.parametrize("bad", [0, 5, -1, 2.0, "2", True, None, [2]])
def test_a_count_out_of_range_is_a_problem_and_never_held(bad: object) -> None:
    """Regression guard: a count above the declared maximum (or no count at all) must never turn
    into a hold larger than the table declares, nor a silent default."""
    book = parse_pricing(PER_OUTPUT + PER_TOKEN)
    image, chat = book.price_for("img/multi"), book.price_for("llm/chat")
    problem = image.input_problem({"num_outputs": bad})
    assert problem is not None and "'num_outputs'" in problem and "from 1 to 4" in problem
    with pytest.raises(ValueError, match="num_outputs"):
        image.hold_amount({"num_outputs": bad})
    if bad != 5:  # 5 tokens is in range
        assert "'max_tokens'" in (chat.input_problem({"max_tokens": bad}) or "")
    assert chat.input_problem({"max_tokens": 513}) is not None
    # Fixed and metered prices do not read the input.
    for other in ("a/fixed", "a/metered"):
        assert METERED.price_for(other).input_problem({"num_outputs": bad}) is None
        assert METERED.price_for(other).input_problem({"max_tokens": bad}) is None


@pytest.mark.parametrize(
    ("input", "stored", "credits"),
    [
        ({}, 1, 5),
        ({"num_outputs": 3}, 3, 15),
        ({"num_outputs": 3}, 2, 10),  # fewer stored than asked: only those
        ({"num_outputs": 3}, 0, 0),  # (allow_empty_output decides whether 0 may succeed)
        ({"num_outputs": 2}, 4, 10),  # more stored than held: never above the hold
        ({"num_outputs": 2}, None, 10),  # no count: the hold
    ],
)
def test_per_output_charge_counts_the_outputs_stored(
    input: dict, stored: int | None, credits: int
) -> None:
    price = parse_pricing(PER_OUTPUT).price_for("img/multi")
    assert price.charge_for(None, input=input, stored_outputs=stored) == credits


@pytest.mark.parametrize(
    ("metrics", "credits"),
    [
        ({"input_token_count": 6, "output_token_count": 10}, 6),  # ceil(0.06 + 5)
        ({"input_token_count": 0, "output_token_count": 0}, 0),
        ({"input_token_count": 100, "output_token_count": 2}, 2),  # exactly 1 + 1
        ({"input_token_count": 1, "output_token_count": 64}, 33),  # ceil(0.01 + 32)
        ({"input_token_count": 5000, "output_token_count": 64}, 42),  # capped at the hold
        ({"output_token_count": 10}, 42),  # a count missing: the hold
        ({"input_token_count": 6}, 42),
        ({}, 42),
        (None, 42),
        ({"input_token_count": -1, "output_token_count": 10}, 42),  # malformed: the hold
        ({"input_token_count": 6.5, "output_token_count": 10}, 42),
        ({"input_token_count": True, "output_token_count": 10}, 42),
        ({"input_token_count": "6", "output_token_count": 10}, 42),
    ],
)
def test_per_token_charge_is_the_ceiling_of_the_counts_capped_at_the_hold(
    metrics: dict | None, credits: int
) -> None:
    """Regression guard: a prediction whose metrics lack (or garble) a token count is charged
    the hold, as a metered one without predict_time, never zero and never more."""
    price = parse_pricing(PER_TOKEN).price_for("llm/chat")
    assert price.charge_for(None, input={}, metrics=metrics) == credits


def test_per_token_arithmetic_is_decimal() -> None:
    # In binary floating point 0.1 * 3 is 0.30000000000000004, whose ceiling would be 1 too many.
    book = parse_pricing(
        '[models."a/b"]\ncredits_per_input_token = 0.1\ncredits_per_output_token = 0.1\n'
        'max_tokens_field = "n"\nmax_tokens_default = 10\nmax_tokens_max = 100\n'
        "max_input_tokens = 100\n"
    )
    price = book.price_for("a/b")
    assert (
        price.charge_for(input={}, metrics={"input_token_count": 20, "output_token_count": 10}) == 3
    )


_OUT = '[models."a/b"]\ncredits_per_output = 5\noutputs_field = "n"\n'
_TOK = (
    '[models."a/b"]\ncredits_per_input_token = 1\ncredits_per_output_token = 2\n'
    'max_tokens_field = "max_tokens"\nmax_input_tokens = 10\n'
)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (_OUT, "per_output price also needs outputs_default, outputs_max"),
        (_OUT + "outputs_default = 1\noutputs_max = 0\n", "outputs_max must be a whole number"),
        (_OUT + "outputs_default = 5\noutputs_max = 4\n", "outputs_default must be .* 1 to 4"),
        (_OUT + "outputs_default = 0\noutputs_max = 4\n", "outputs_default must be"),
        (_OUT + "outputs_default = 1.5\noutputs_max = 4\n", "outputs_default must be"),
        (
            _OUT.replace("= 5", "= 2.5") + "outputs_default = 1\noutputs_max = 4\n",
            "credits_per_output must be a whole number",
        ),
        (
            _OUT.replace('"n"', "3") + "outputs_default = 1\noutputs_max = 4\n",
            "outputs_field must be the name of an input field",
        ),
        (
            _OUT.replace('"n"', '""') + "outputs_default = 1\noutputs_max = 4\n",
            "outputs_field must be the name",
        ),
        (
            _OUT + "outputs_default = 1\noutputs_max = 4\ncredits = 5\n",
            "mix kinds of price \\(fixed, per_output\\)",
        ),
        (
            _OUT + "outputs_default = 1\noutputs_max = 4\nmax_seconds = 5\n",
            "mix kinds of price",
        ),
        (
            _OUT + "outputs_default = 1\noutputs_max = 4\nmax_tokens_field = 'n'\n",
            "mix kinds of price",
        ),
        (
            _OUT + "outputs_default = 1\noutputs_max = 4\noutputs = 2\n",
            "unknown fields \\['outputs'\\]",
        ),
        (
            _OUT.replace("= 5", "= 1000000000000000") + "outputs_default = 1\noutputs_max = 4\n",
            "too large",
        ),
        (_TOK, "per_token price also needs max_tokens_default, max_tokens_max"),
        (_TOK + "max_tokens_default = 64\n", "also needs max_tokens_max"),
        (
            _TOK + "max_tokens_default = 600\nmax_tokens_max = 512\n",
            "max_tokens_default must be a whole number from 1 to 512",
        ),
        (
            _TOK.replace("= 1\n", "= 0\n", 1) + "max_tokens_default = 6\nmax_tokens_max = 9\n",
            "credits_per_input_token must be a finite number > 0",
        ),
        (
            _TOK.replace("= 2\n", '= "2"\n') + "max_tokens_default = 6\nmax_tokens_max = 9\n",
            "credits_per_output_token must be a number",
        ),
        (
            _TOK.replace("= 10\n", "= 0\n") + "max_tokens_default = 6\nmax_tokens_max = 9\n",
            "max_input_tokens must be a whole number",
        ),
        (
            _TOK + "max_tokens_default = 6\nmax_tokens_max = 9\ncredits_per_output = 1\n",
            "mix kinds of price \\(per_output, per_token\\)",
        ),
        (
            '[models."a/b"]\ncredits_per_input_token = 1\n',
            "per_token price also needs credits_per_output_token",
        ),
    ],
)
def test_malformed_counted_tables_raise_config_error(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_pricing(path)
    assert "bad.toml" in str(info.value) and "'a/b'" in str(info.value)
