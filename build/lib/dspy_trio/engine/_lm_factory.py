"""The provider registry: how each ``LMConfig.provider`` builds its backend.

A new provider is its own module in ``engine/lm/`` with a ``from_config(config, *, cache)`` constructor,
plus one line here. Nothing else names providers: ``LMConfig`` validates against this registry, and the
environment's API-key fallback (``OPENAI_API_KEY`` ...) comes from it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs

from .lm import AnthropicLM, OpenAICompatibleLM, SimulatedLM, ThreadedLM, TrioLM

if TYPE_CHECKING:
    from ._config import LMConfig


@attrs.frozen
class Provider:
    """One kind of LM backend.

    Attributes:
        build: ``build(config, cache=...)``: a new backend; does no I/O.
        needs_api_base: ``api_base`` is required.
        key_env: The environment variable holding its API key when ``LM_API_KEY`` is unset and the
            LM has no key of its own.
    """

    build: Callable[..., TrioLM]
    needs_api_base: bool = False
    key_env: str | None = None


PROVIDERS: dict[str, Provider] = {
    "simulated": Provider(SimulatedLM.from_config),
    "openai": Provider(OpenAICompatibleLM.from_config, needs_api_base=True, key_env="OPENAI_API_KEY"),
    "anthropic": Provider(AnthropicLM.from_config, key_env="ANTHROPIC_API_KEY"),
    "dspy": Provider(ThreadedLM.from_config),
}


def build_lm(config: LMConfig, *, cache: bool = False) -> TrioLM:
    """A new LM backend for ``config``. Does no I/O; the caller owns it and must ``aclose`` it."""
    return PROVIDERS[config.provider].build(config, cache=cache)
