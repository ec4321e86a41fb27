"""The request models of every transport (web/models.py): what each field takes and refuses."""

from __future__ import annotations

from typing import Any

import pytest

from dspy_trio.web.errors import HTTPError
from dspy_trio.web.models import BatchRequest, validate

ITEMS = [{"question": "q"}]


def test_an_integer_written_with_a_fraction_of_zero_is_that_integer() -> None:
    # JSON has one number type, and JSON Schema (the document's "integer") counts 140.0 as an integer.
    batch = validate(BatchRequest, {"items": ITEMS, "concurrency": 140.0})
    assert batch.concurrency == 140
    assert type(batch.concurrency) is int


@pytest.mark.parametrize("concurrency", [1.5, True, "2", 0.0, 257.0, float("inf"), None])
def test_anything_else_is_not_an_integer(concurrency: Any) -> None:
    with pytest.raises(HTTPError) as caught:
        validate(BatchRequest, {"items": ITEMS, "concurrency": concurrency})
    assert (caught.value.status, caught.value.param) == (422, "concurrency")
