"""Per-field text of streamed JSON, however the LM splits it into chunks."""

from __future__ import annotations

import json
from typing import Any

import dspy
import pytest
from dspy.clients.call_result import attributes
from dspy.clients.engines.streaming import EngineChunk
from dspy.streaming import StreamListener

from dspy_trio.engine._json_fields import JSONFieldScanner

from .helpers import random_chunks

DOCUMENT = {
    "answer": 'He said "hi"\\ and left.\nNext line \u00e9 \U0001f600 done',
    "count": 42,
    "tags": ["a, b", "c}"],
    "meta": {"x": [1, 2], "y": "}"},
    "ok": True,
}


def scan(text: str, pieces: list[str]) -> dict[str, str]:
    scanner = JSONFieldScanner(DOCUMENT)
    out: dict[str, str] = {}
    for piece in pieces:
        for field, delta in scanner.feed(piece):
            out[field] = out.get(field, "") + delta
    return out


@pytest.mark.parametrize("seed", range(20))
def test_any_chunking_gives_the_decoded_strings_and_raw_values(seed: int) -> None:
    text = "```json\n" + json.dumps(DOCUMENT, indent=1) + "\n```"
    assert scan(text, random_chunks(text, seed, 6)) == {
        "answer": DOCUMENT["answer"],
        "count": "42",
        "tags": json.dumps(DOCUMENT["tags"], indent=1).replace("\n", "\n "),
        "meta": json.dumps(DOCUMENT["meta"], indent=1).replace("\n", "\n "),
        "ok": "true",
    }


def test_a_second_object_is_a_new_call_and_unknown_keys_are_ignored() -> None:
    scanner = JSONFieldScanner(["answer"])
    assert scanner.feed('{"answer": "one", "other": "x"}') == [("answer", "one")]
    assert scanner.feed('{"answer": "two"}') == [("answer", "two")]


def test_dspys_own_listener_leaks_json_punctuation_which_is_why_the_scanner_exists() -> None:
    program = dspy.Predict("question -> answer, topic")
    listener = StreamListener("answer", predict=program, predict_name="self")
    text = ""
    with dspy.context(adapter=dspy.JSONAdapter()):
        for token in [
            '{"',
            "answer",
            '":',
            ' "',
            "memory",
            " flat",
            '",',
            ' "',
            "topic",
            '":',
            ' "',
            "x",
            '"}',
        ]:
            chunk: Any = EngineChunk(
                id=None,
                model="m",
                predict_id=id(program),
                choices=[attributes({"index": 0, "delta": {"content": token}})],
            )
            if response := listener.receive(chunk):
                text += response.chunk
    assert text != "memory flat"
    assert '"' in text
