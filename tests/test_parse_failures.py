"""A reply that does not fit the signature (issue #15): the error names the adapters tried, quotes the
reply (truncated), and says what to change. Engine and HTTP."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from dspy_trio.engine import EngineConfig, LMConfig, ProgramError, SimulatedSettings, open_engine

from .helpers import CountingLM
from .web_helpers import running, settings

JUNK = "Sure! The answer is blue. " * 20  # 520 characters, no markers, no JSON


class Junk(CountingLM):
    def render(self, messages: Any) -> str:
        return JUNK


def config(adapter: str) -> EngineConfig:
    return EngineConfig(
        lms={"default": LMConfig(settings=SimulatedSettings(first_token_delay=0.0, token_delay=0.0))},
        adapter=adapter,
    )  # type: ignore[arg-type]


async def test_chat_failure_names_both_adapters_quotes_the_reply_and_suggests_json() -> None:
    async with open_engine(config("chat"), lms={"default": Junk(first_token_delay=0)}) as engine:
        with pytest.raises(ProgramError) as caught:
            await engine.predict("default", {"question": "q"})
    message = str(caught.value)
    assert "Adapters tried: ChatAdapter then JSONAdapter (configured: 'chat')" in message
    assert "expected output fields: answer" in message
    assert repr(JUNK.strip()[:200]) in message
    assert "(first 200 of 519 characters)" in message
    assert JUNK.strip()[:201] not in message  # truncated, not the whole reply
    assert 'adapter = "json" (LM_ADAPTER=json)' in message


async def test_json_failure_names_only_json_and_suggests_something_else() -> None:
    async with open_engine(config("json"), lms={"default": Junk(first_token_delay=0)}) as engine:
        with pytest.raises(ProgramError) as caught:
            await engine.predict("default", {"question": "q"})
    message = str(caught.value)
    assert "Adapters tried: JSONAdapter (configured: 'json')" in message
    assert "ChatAdapter" not in message
    assert 'adapter = "chat"' in message


async def test_the_http_502_carries_the_same_explanation() -> None:
    async with (
        running(settings(engine=config("chat")), lms={"default": Junk(first_token_delay=0)}) as server,
        httpx.AsyncClient(base_url=server.url) as client,
    ):
        response = await client.post("/v1/programs/default/predict", json={"inputs": {"question": "q"}})
    assert response.status_code == 502
    text = response.text
    assert "ChatAdapter then JSONAdapter" in text
    assert "LM_ADAPTER=json" in text
