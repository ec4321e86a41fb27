"""The provider registry: the name ``provider = "..."`` selects, and the settings type that provider owns.

A new provider is its own module in ``engine/lm/`` (its backend, and a frozen settings type whose fields
are its keys of the ``[lms.NAME]`` table and whose ``build`` makes the backend) plus one line here.
Nothing else names providers: ``LMConfig`` reads an LM's table through this registry, and the
environment's API-key fallback (``OPENAI_API_KEY`` ...) is the settings type's ``key_env``.
"""

from __future__ import annotations

from typing import Any

import attrs

from ._errors import ConfigError
from .lm import AnthropicSettings, DSPySettings, OpenAISettings, ProviderSettings, SimulatedSettings

PROVIDERS: dict[str, type[ProviderSettings]] = {
    settings.provider: settings
    for settings in (
        SimulatedSettings,
        OpenAISettings,
        AnthropicSettings,
        DSPySettings,
    )
}


def settings_type(provider: Any) -> type[ProviderSettings]:
    """The settings type of ``provider``.

    Raises:
        ConfigError: no provider of that name is registered.
    """
    kind = PROVIDERS.get(provider) if isinstance(provider, str) else None
    if kind is None:
        raise ConfigError(f"provider must be one of {', '.join(PROVIDERS)}; got {provider!r}")
    return kind


def keys_of(kind: type[ProviderSettings]) -> set[str]:
    """The keys a provider's settings type owns."""
    return {field.name for field in attrs.fields(kind)}  # type: ignore[arg-type]


def owners_of(key: str) -> list[str]:
    """The providers that have ``key`` among their keys, in registry order."""
    return [name for name, kind in PROVIDERS.items() if key in keys_of(kind)]
