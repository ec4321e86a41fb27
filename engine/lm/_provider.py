"""What a provider is to the engine: the settings type it owns.

An LM's table in the config file (``[lms.NAME]``) has keys every LM has (``provider``, ``model``,
``params`` and the call policies ``timeouts``, ``rate_limit``, ``retry``, ``adaptive``: the engine's
``LMConfig``) and keys of its provider (``api_base``, ``http``, ``threads``, ...). The provider's keys
are the fields of its settings type, an ``@attrs.frozen`` class in the provider's own module beside its
backend: the type validates them, names the provider (``provider = "openai"`` selects it), and builds
the backend. The engine's registry (``dspy_trio.engine._providers``) lists the types; nothing else
knows a provider's keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Protocol

import attrs

from .._validate import header_value, http_url, optional
from ._base import TrioLM


class ProviderSettings(Protocol):
    """The settings of one provider (see the module docstring).

    Attributes:
        provider: The name ``provider = "..."`` selects these settings by.
        key_env: The environment variable holding the provider's API key, read when neither the LM
            nor ``LM_API_KEY`` gives one (None: no such fallback).
    """

    provider: ClassVar[str]
    key_env: ClassVar[str | None]

    def build(self, model: str, params: Mapping[str, Any], *, cache: bool = False) -> TrioLM:
        """A new backend for ``model`` with default request ``params``. Does no I/O; the caller owns it
        and must ``aclose`` it.

        Raises:
            ConfigError: the settings and the parameters cannot work together.
        """
        ...


def api_key_field() -> Any:
    """The ``api_key`` key: sent as the provider expects, never shown in ``repr`` or in errors."""
    return attrs.field(default=None, repr=False, validator=optional(header_value))


def api_base_field(default: str | None = None) -> Any:
    """The ``api_base`` key: the provider's API root, an http(s) URL (None when ``default`` is None and
    none is given)."""
    return attrs.field(default=default, validator=optional(http_url))
