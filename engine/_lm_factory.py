"""Building LM backends from :class:`~engine.LMConfig` values."""

from __future__ import annotations

from ._config import LMConfig
from .lm import AnthropicLM, HTTPSettings, OpenAICompatibleLM, SimulatedLM, ThreadedLM, TrioLM


def build_lm(config: LMConfig, *, cache: bool = False) -> TrioLM:
    """A new LM backend for ``config``. Does no I/O; the caller owns it and must ``aclose`` it."""
    params = dict(config.params)
    if config.provider == "simulated":
        return SimulatedLM(
            config.model,
            first_token_delay=config.first_token_delay,
            token_delay=config.token_delay,
            words_per_field=config.words_per_field,
            cache=cache,
            **params,
        )
    if config.provider in ("openai", "anthropic"):
        http = HTTPSettings(
            connect_timeout=config.connect_timeout,
            read_timeout=config.timeout,
            max_connections=config.max_connections,
        )
        if config.provider == "anthropic":
            base = config.api_base or "https://api.anthropic.com"
            return AnthropicLM(
                config.model, api_key=config.api_key, api_base=base, http=http, cache=cache, **params
            )
        assert config.api_base is not None  # LMConfig checks this
        return OpenAICompatibleLM(
            config.model, api_base=config.api_base, api_key=config.api_key, http=http, cache=cache, **params
        )
    extra = {"api_base": config.api_base, "api_key": config.api_key}
    return ThreadedLM.from_model(
        config.model,
        threads=config.threads,
        timeout=config.timeout,
        cache=cache,
        **{k: v for k, v in extra.items() if v is not None},
        **params,
    )
