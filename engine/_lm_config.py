"""One upstream LM's configuration: what every LM has, and its provider's settings.

An ``[lms.NAME]`` table mixes two kinds of keys, and :class:`LMConfig` keeps them apart. The keys every
LM has are its fields: ``provider``, ``model``, ``params`` and the policies its calls run under, nested
as the frozen values the engine runs them with (``[lms.NAME.retry]`` is a :class:`RetryPolicy`, not
copied into flat fields). Every other key belongs to the provider and is a field of the provider's own
settings type (``engine/lm/*.py``, listed in ``_providers``): ``api_base``, ``api_key``, ``http``,
``stream_upstream``, ``threads``, the simulated LM's pacing. A key the chosen provider does not have is
refused by name, with the providers that do have it.

::

    LMConfig(model="gpt-4o-mini", settings=OpenAISettings(api_base="https://api.openai.com/v1"))
    LMConfig.from_mapping({"provider": "openai", "model": "gpt-4o-mini", "api_base": "https://..."})
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import attrs

from ._adaptive import AdaptiveSettings
from ._errors import ConfigError
from ._providers import PROVIDERS, keys_of, owners_of, settings_type
from ._retry import RetryPolicy
from ._tables import build, copy_mapping, fields_of, named, nested
from ._upstream import UpstreamPolicy
from ._validate import json_compliant, optional_positive
from .lm import ProviderSettings, SimulatedSettings, TrioLM


@attrs.frozen
class RateLimit:
    """Requests and tokens per minute allowed to one upstream (``[lms.NAME.rate_limit]``).

    Attributes:
        rpm: Requests per minute (None: unlimited).
        tpm: Tokens (prompt + completion) per minute, charged with an estimate and corrected after.
    """

    rpm: float | None = attrs.field(default=None, validator=optional_positive)
    tpm: float | None = attrs.field(default=None, validator=optional_positive)


@attrs.frozen
class CallTimeouts:
    """Time limits of one LM call's attempts, inside the caller's deadline (``[lms.NAME.timeouts]``).

    Attributes:
        attempt: Seconds one attempt may take in total (None: no limit but the deadline).
        first_token: Seconds a stream may take to deliver its first chunk.
        stall: Seconds a stream may stay silent between chunks (time the consumer holds it back does
            not count).
    """

    attempt: float | None = attrs.field(default=None, validator=optional_positive)
    first_token: float | None = attrs.field(default=None, validator=optional_positive)
    stall: float | None = attrs.field(default=None, validator=optional_positive)


# Flat keys of earlier versions and where they live now (for a helpful error).
_MOVED = {
    "timeout": "http.read_timeout",
    "connect_timeout": "http.connect_timeout",
    "max_connections": "http.max_connections",
    "rpm": "rate_limit.rpm",
    "tpm": "rate_limit.tpm",
    "max_attempts": "retry.max_attempts",
    "retry_base_delay": "retry.base_delay",
    "retry_max_delay": "retry.max_delay",
    "retry_budget": "retry.budget_ratio",
    "attempt_timeout": "timeouts.attempt",
    "first_token_timeout": "timeouts.first_token",
    "stall_timeout": "timeouts.stall",
    "adaptive_concurrency": "adaptive (a table; present means on)",
    "min_concurrency": "adaptive.minimum",
    "max_concurrency": "adaptive.maximum",
    "initial_concurrency": "adaptive.initial",
}


# What the backends take as constructor arguments or set in the request body themselves: a ``params``
# key of the same name would collide with the argument (a TypeError at start-up) or silently replace the
# prompt (``messages``), the model, or the framing of the answer (``stream``). A provider's own keys are
# refused too (see LMConfig).
RESERVED_PARAMS = frozenset(
    {
        "model",
        "model_type",
        "messages",
        "prompt",
        "stream",
        "stream_options",
        "cache",
        "api_base",
        "api_key",
        "http",
        "transport",
        "network",
        "threads",
        "stream_upstream",
        "timeout",
        "num_retries",
    }
)


def check_params(params: Any, where: str) -> None:
    """Refuse request parameters that cannot be sent: not a table, a reserved key (see
    :data:`RESERVED_PARAMS`), a value JSON cannot carry (NaN, infinities), or a ``max_tokens`` that is
    not a positive integer (None: send no cap).

    Raises:
        ConfigError: naming ``where`` and the bad key or value.
    """
    if not isinstance(params, Mapping):
        raise ConfigError(f"{where} must be a table of request parameters, got {params!r}")
    if reserved := sorted(set(map(str, params)) & RESERVED_PARAMS):
        raise ConfigError(
            f"{where} cannot set {', '.join(reserved)}: the engine sets these itself"
            " (the model, api_base and api_key are fields of the LM, not request parameters)"
        )
    json_compliant(dict(params), where)
    tokens = params.get("max_tokens")
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
        raise ConfigError(f"{where}.max_tokens must be a positive integer, got {tokens!r}")


def _params(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    check_params(value, attribute.name)


def _registered(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if type(value) not in PROVIDERS.values():
        known = ", ".join(kind.__name__ for kind in PROVIDERS.values())
        raise ConfigError(
            f"{attribute.name} must be the settings of a registered provider ({known}), got {value!r}"
        )


@attrs.frozen
class LMConfig:
    """One upstream language model and the policies its calls run under.

    Attributes:
        model: The model name.
        params: Default request parameters (``temperature``, ``max_tokens``, ...). The HTTP providers
            send ``max_tokens = 1024`` unless it is set here.
        timeouts: Per-attempt time limits (attempt, first token, stall).
        rate_limit: Requests and tokens per minute.
        retry: Retries of retryable failures (attempts, backoff, budget and its window).
        adaptive: An AIMD limit on concurrent calls to this upstream; None for none.
        settings: The provider's own settings, whose type selects the provider: ``SimulatedSettings``
            (the built-in simulated LM, no network), ``OpenAISettings`` (any OpenAI-compatible
            endpoint, Trio-native), ``AnthropicSettings`` (Anthropic's Messages API, Trio-native) or
            ``DSPySettings`` (any stock ``dspy.LM`` model string, run in worker threads).
    """

    model: str = attrs.field(default="simulated/lm", validator=attrs.validators.instance_of(str))
    params: Mapping[str, Any] = attrs.field(
        factory=dict, converter=copy_mapping, validator=_params, hash=False
    )
    timeouts: CallTimeouts = nested(CallTimeouts)
    rate_limit: RateLimit = nested(RateLimit)
    retry: RetryPolicy = nested(RetryPolicy)
    adaptive: AdaptiveSettings | None = nested(AdaptiveSettings, optional=True)
    settings: ProviderSettings = attrs.field(factory=SimulatedSettings, validator=_registered)

    def __attrs_post_init__(self) -> None:
        # A provider's own key as a request parameter would collide with its backend's argument.
        if clash := sorted(set(map(str, self.params)) & keys_of(type(self.settings))):
            raise ConfigError(
                f"params cannot set {', '.join(clash)}: a setting of the {self.provider} provider, not a"
                " request parameter"
            )

    @property
    def provider(self) -> str:
        """The provider's name (``provider = "..."`` in TOML), from the settings' type."""
        return self.settings.provider

    def policy(self) -> UpstreamPolicy:
        """The call policy (rate limits, retries, timeouts, adaptive concurrency) of this LM."""
        return UpstreamPolicy(
            rpm=self.rate_limit.rpm,
            tpm=self.rate_limit.tpm,
            retry=self.retry,
            attempt_timeout=self.timeouts.attempt,
            first_token_timeout=self.timeouts.first_token,
            stall_timeout=self.timeouts.stall,
            adaptive=self.adaptive,
        )

    def build_lm(self, *, cache: bool = False) -> TrioLM:
        """A new backend for this LM (the provider builds it). Does no I/O; the caller owns it and must
        ``aclose`` it.

        Raises:
            ConfigError: the provider refuses this combination of model and parameters.
        """
        return self.settings.build(self.model, self.params, cache=cache)

    @classmethod
    def from_mapping(
        cls, data: Mapping[str, Any], *, where: str = "lm", env: Mapping[str, str] | None = None
    ) -> LMConfig:
        """Build from a TOML table: the shared keys, nested tables (``timeouts``, ``rate_limit``,
        ``retry``, ``adaptive``, and the provider's, e.g. ``http``) as their frozen values, the rest as
        the provider's settings. ``api_key_env`` names an environment variable holding the key, which
        must be set; ``env`` is where it is looked up (and then the process environment)."""
        values = dict(data)
        env = os.environ if env is None else env
        if env_name := values.pop("api_key_env", None):
            key = env.get(str(env_name)) or os.environ.get(str(env_name))
            if not key:
                raise ConfigError(f"{where}: api_key_env names {env_name}, which is not set")
            values.setdefault("api_key", key)
        return lm_from_table(values, where)


def not_a_key_of(shown: str, key: str, provider: str) -> str:
    """What is wrong with ``key`` (written ``shown``) in the table of an LM of ``provider``: it is a key
    of other providers."""
    owners = owners_of(key)
    listed = " and ".join([", ".join(owners[:-1]), owners[-1]] if len(owners) > 1 else owners)
    return f"{shown} applies to the {listed} provider{'s' if len(owners) > 1 else ''}, not {provider}"


# The keys every LM has: LMConfig's fields, and the provider's name.
SHARED_KEYS = (fields_of(LMConfig) - {"settings"}) | {"provider"}


def lm_from_table(
    values: Mapping[str, Any], where: str, *, names: Mapping[str, str] | None = None
) -> LMConfig:
    """An :class:`LMConfig` from one flat table (nested values as tables or as frozen values).

    Args:
        where: The table's TOML key (``lms.big``), or ``LM_*`` for the environment.
        names: Key -> ``VARIABLE='value'``, for the keys an environment variable set.

    Raises:
        ConfigError: naming the key (or variable): an unknown provider or key, a key of another
            provider, a key that moved into a nested table, a bad value.
    """
    moved = sorted(set(values) & set(_MOVED))
    if moved:
        hints = ", ".join(f"{key} -> {_MOVED[key]}" for key in moved)
        raise ConfigError(f"{where}: these keys moved into nested tables: {hints}")
    shared = {key: value for key, value in values.items() if key in SHARED_KEYS}
    own = {key: value for key, value in values.items() if key not in SHARED_KEYS}
    provider = shared.pop("provider", "simulated")
    try:
        kind = settings_type(provider)
        foreign = [key for key in sorted(own) if key not in keys_of(kind) and owners_of(key)]
        if foreign:
            raise ConfigError("; ".join(not_a_key_of(key, key, provider) for key in foreign))
    except ConfigError as exc:
        raise named(exc, where, SHARED_KEYS | set(own), names) from exc
    settings = build(kind, own, where, names=names)
    return build(LMConfig, {**shared, "settings": settings}, where, names=names)
