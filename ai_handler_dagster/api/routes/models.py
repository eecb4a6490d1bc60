"""``GET /v1/models`` (the priced models: their kind of price and what an input holds) and
``POST /v1/quote`` (the hold one request would need, before submitting it).

Both read the worker's price book (``AI_HANDLER_PRICING_FILE``) and nothing else: a quote opens
no transaction and writes nothing. A quote checks what ``generations.submit`` checks of the
model and the input, with the same functions and in the same order (the model reference, the
input, the price, the price's count field), and is refused with the same problem types; it does
not look at a user (their credits, their priority), which only a submit does.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from ai_handler_dagster import generations as gens
from ai_handler_dagster.api import deps, keys
from ai_handler_dagster.api.routes.generations import refusal
from ai_handler_dagster.domain import InvalidModelRef, parse_model_ref
from ai_handler_dagster.pricing import Price, PriceBook, UnpricedModel

router = APIRouter(prefix="/v1", tags=["models"])


class CountField(BaseModel):
    """The input field a counted price (per output, per token) reads."""

    name: str
    default: int = Field(description="Its value when the input leaves it out.")
    max: int = Field(description="The largest accepted value.")


class Rates(BaseModel):
    """The figures of the price table (decimals as strings, exact); the kind's own are set."""

    credits: int | None = None
    credits_per_second: str | None = None
    max_seconds: str | None = None
    credits_per_output: int | None = None
    credits_per_input_token: str | None = None
    credits_per_output_token: str | None = None
    max_input_tokens: int | None = None


class ModelPrice(BaseModel):
    """One priced model."""

    model: str = Field(
        description="The price's key: 'owner/name', with ':version' or as 'deployment:owner/name'."
    )
    price_kind: str = Field(description="fixed, metered, per_output or per_token.")
    description: str
    default_hold: int = Field(description="Credits an input that sets no count field holds.")
    max_hold: int = Field(description="The most credits any accepted input holds.")
    count_field: CountField | None = Field(description="The input field the hold counts on.")
    rates: Rates


class ModelList(BaseModel):
    models: list[ModelPrice]


class QuoteBody(BaseModel):
    """A request to price: what a submit would send, without the user."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    input: dict[str, Any]


class Quote(BaseModel):
    """The hold a submit of this request would place now."""

    model: str
    price_kind: str
    hold: int = Field(description="Credits a submit would hold (the most it can be charged).")
    description: str
    count_field: CountField | None


def _count_field(price: Price) -> CountField | None:
    if price.outputs_field is not None:
        assert price.outputs_default is not None and price.outputs_max is not None
        return CountField(
            name=price.outputs_field, default=price.outputs_default, max=price.outputs_max
        )
    if price.max_tokens_field is not None:
        assert price.max_tokens_default is not None and price.max_tokens_max is not None
        return CountField(
            name=price.max_tokens_field, default=price.max_tokens_default, max=price.max_tokens_max
        )
    return None


def _text(value: Decimal | None) -> str | None:
    return None if value is None else str(value)


def _model_price(key: str, price: Price) -> ModelPrice:
    counted = _count_field(price)
    most = {counted.name: counted.max} if counted is not None else {}
    return ModelPrice(
        model=key,
        price_kind=price.kind,
        description=price.describe(),
        default_hold=price.hold_amount({}),
        max_hold=price.hold_amount(most),
        count_field=counted,
        rates=Rates(
            credits=price.credits,
            credits_per_second=_text(price.credits_per_second),
            max_seconds=_text(price.max_seconds),
            credits_per_output=price.credits_per_output,
            credits_per_input_token=_text(price.credits_per_input_token),
            credits_per_output_token=_text(price.credits_per_output_token),
            max_input_tokens=price.max_input_tokens,
        ),
    )


@router.get("/models", summary="The priced models and what their inputs hold")
def list_models(
    caller: keys.Caller = Depends(deps.require(keys.READ)),  # noqa: B008
    prices: PriceBook = Depends(deps.prices),  # noqa: B008
) -> ModelList:
    return ModelList(models=[_model_price(k, prices.price_for(k)) for k in prices.models()])


def quote(prices: PriceBook, model: str, input: dict[str, Any]) -> tuple[Price, int]:
    """The price and hold of a request, refused as ``generations.submit`` refuses it (an
    ``InvalidRequest`` naming the field, ``UnknownModel`` for a model without a price)."""
    try:
        parse_model_ref(model)
    except InvalidModelRef as exc:
        raise gens.InvalidRequest(str(exc), field="model") from None
    try:
        payload = gens.validate_input(input)
    except gens.InvalidRequest as exc:
        raise gens.InvalidRequest(str(exc), field="input") from None
    try:
        price = prices.price_for(model)
    except UnpricedModel as exc:
        raise gens.UnknownModel(str(exc), field="model") from None
    problem = price.input_problem(payload)
    if problem is not None:
        raise gens.InvalidRequest(problem, field="input")
    return price, price.hold_amount(payload)


@router.post(
    "/quote",
    summary="What a request would hold, before submitting it",
    responses={
        404: {"description": "the model has no price"},
        422: {"description": "the model reference or the input is malformed"},
    },
)
def quote_request(
    body: QuoteBody,
    caller: keys.Caller = Depends(deps.require(keys.READ)),  # noqa: B008
    prices: PriceBook = Depends(deps.prices),  # noqa: B008
) -> Quote:
    try:
        price, hold = quote(prices, body.model, body.input)
    except gens.InvalidRequest as exc:
        raise refusal(exc, prices=prices, model=body.model, input=body.input) from None
    return Quote(
        model=body.model,
        price_kind=price.kind,
        hold=hold,
        description=price.describe(),
        count_field=_count_field(price),
    )
