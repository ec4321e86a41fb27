"""pytest fixtures for code that embeds the engine (requires pytest-trio).

- ``fake_upstream``: a running :class:`~dspy_trio.engine.testing.FakeUpstream` on 127.0.0.1 (ephemeral port).
- ``simulated_engine``: an open engine whose default program runs on the built-in simulated LM,
  paced at 50 ms to the first token and 10 ms per token on Trio's clock.
- ``fake_upstream_engine``: an open engine whose default LM is Trio-native HTTP to ``fake_upstream``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from .._engine import Engine, open_engine
from .._engine_config import EngineConfig
from .._lm_config import LMConfig
from ..lm import OpenAISettings
from .fake_upstream import FakeUpstream, open_fake_upstream


@pytest.fixture
async def fake_upstream() -> AsyncIterator[FakeUpstream]:
    async with open_fake_upstream() as upstream:
        yield upstream


@pytest.fixture
async def simulated_engine() -> AsyncIterator[Engine]:
    async with open_engine(EngineConfig()) as engine:
        yield engine


@pytest.fixture
async def fake_upstream_engine(fake_upstream: FakeUpstream) -> AsyncIterator[Engine]:
    lm = LMConfig(model="fake-model", settings=OpenAISettings(api_base=fake_upstream.url, api_key="test-key"))
    async with open_engine(EngineConfig(lms={"default": lm})) as engine:
        yield engine
