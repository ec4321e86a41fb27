"""The request models of every transport: HTTP bodies and ``/v1/ws`` frames share fields and limits.

``timeout_secs`` is a number only (``true`` and ``"5"`` are refused), positive and finite. An integer
field (:data:`Integer`) takes a number with no fraction, ``8`` or ``8.0`` (JSON has one number type, and
JSON Schema's ``integer``, which /openapi.json says, counts both), and refuses ``8.5``, ``true`` and ``"8"``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

import pydantic

from .errors import HTTPError


def _integral(value: Any) -> Any:
    """A float with no fraction as the integer it is (``140.0`` is ``140``); anything else unchanged."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# Constraints go before it (``Annotated[int, pydantic.Field(ge=1), *INTEGRAL]``), so the JSON Schema of a
# constrained integer keeps them (``minimum``), also inside a union with null.
INTEGRAL = (pydantic.Strict(), pydantic.BeforeValidator(_integral))
Integer = Annotated[int, *INTEGRAL]
Timeout = Annotated[float | None, pydantic.Field(default=None, gt=0, strict=True, allow_inf_nan=False)]
FrameId = Annotated[str, pydantic.Field(min_length=1, max_length=128)]


class _Strict(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")


class SeedRequest(_Strict):
    """The plain endpoints' body: a question for the default program."""

    question: str
    timeout_secs: Timeout = None


class ProgramRequest(_Strict):
    """A request to a named program: its input fields."""

    inputs: dict[str, Any]
    timeout_secs: Timeout = None


class BatchRequest(_Strict):
    """A batch for a named program: one inputs object per item."""

    # At most ``max_batch_items`` (a setting: the route answers 413 past it; /openapi.json says maxItems).
    items: list[dict[str, Any]] = pydantic.Field(min_length=1)
    concurrency: Integer = pydantic.Field(default=8, ge=1, le=256)
    fail_fast: bool = pydantic.Field(default=False, strict=True)
    timeout_secs: Timeout = None


class RunFrame(ProgramRequest):
    """``/v1/ws``: run a program; ``id`` is the client's label for it within the socket.
    ``cache_control`` takes ``Cache-Control``'s directives for this request (``no-cache``,
    ``no-store``; others ignored), on top of the handshake's."""

    id: FrameId
    type: Literal["predict", "stream"]
    program: str = "default"
    cache_control: str | None = pydantic.Field(default=None, max_length=256, strict=True)


class CancelFrame(_Strict):
    """``/v1/ws``: cancel the request the client labelled ``id`` on this socket."""

    id: FrameId
    type: Literal["cancel"]


Frame = Annotated[RunFrame | CancelFrame, pydantic.Field(discriminator="type")]
FRAME: pydantic.TypeAdapter[RunFrame | CancelFrame] = pydantic.TypeAdapter(Frame)


M = TypeVar("M", bound=pydantic.BaseModel)


def validate(model: type[M], value: Any) -> M:
    """Validate a parsed JSON value against ``model``.

    Raises:
        HTTPError: 422 ``invalid_body`` naming the first wrong field.
    """
    if not isinstance(value, dict):
        raise HTTPError(
            422,
            f"the body must be a JSON object, got {json_type(value)}",
            type="invalid_request_error",
            code="invalid_body",
        )
    try:
        return model.model_validate(value)
    except pydantic.ValidationError as exc:
        raise validation_error(exc) from None


def json_type(value: Any) -> str:
    """How JSON names the type of a parsed value (``an array``, ``a string``, ...)."""
    match value:
        case None:
            return "null"
        case bool():
            return "a boolean"
        case int() | float():
            return "a number"
        case str():
            return "a string"
        case list():
            return "an array"
        case _:
            return "an object"


def validation_error(exc: pydantic.ValidationError, *, tagged: bool = False) -> HTTPError:
    """A 422 naming the first wrong field of a validation error (``tagged``: of a tagged union such
    as :data:`FRAME`, whose first location part is the tag)."""
    first = exc.errors()[0]
    loc = first.get("loc", ())
    if tagged and first.get("type") != "union_tag_invalid":
        loc = loc[1:]
    field = ".".join(str(part) for part in loc)
    return HTTPError(
        422,
        f"{field or 'body'}: {first.get('msg', 'invalid')}",
        type="invalid_request_error",
        code="invalid_body",
        param=field or None,
    )
