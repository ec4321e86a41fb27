"""Reading the configuration file and the environment (``EngineConfig.from_env`` and ``from_toml``).

Environment (each variable overrides the ``default`` LM of the file, or the engine's limits)::

    DSPY_TRIO_CONFIG      path of a TOML file read first (see docs/configuration.md)
    LM_PROVIDER           simulated | openai | anthropic | dspy (default: the file's provider; else openai
                          if LM_API_BASE is set, else simulated). Switching the provider drops the file's
                          api_key and api_base, and every key the new provider does not have: they
                          belonged to the other provider.
    LM_MODEL              model name, e.g. gpt-4o-mini, or openai/gpt-4o-mini for the dspy provider
    LM_API_BASE           api_base: API root of the provider, e.g. http://127.0.0.1:8000/v1
    LM_API_KEY            api_key; wins over the file's api_key / api_key_env (an LM without a key of its
                          own falls back to its provider's variable: OPENAI_API_KEY, ANTHROPIC_API_KEY)
    LM_ADAPTER            chat | json: the default DSPy adapter (same as DSPY_TRIO_ADAPTER)
    LM_MAX_TOKENS         output-token cap sent with every call, a positive integer (default 1024 for the
                          HTTP providers)
    LM_PARAMS             request parameters as a JSON object, e.g. '{"temperature": 0.2}'
    LM_STREAM_UPSTREAM    true | false: stream_upstream (openai and anthropic)
    LM_TIMEOUT            http.read_timeout: seconds the provider may stay silent within one call (120)
    LM_RPM, LM_TPM        rate_limit.rpm / rate_limit.tpm: requests / tokens per minute (unlimited)
    LM_MAX_ATTEMPTS       retry.max_attempts: attempts per LM call, retries included (3)
    LM_ATTEMPT_TIMEOUT    timeouts.attempt: seconds one attempt may take in total (none)
    DSPY_TRIO_MAX_IN_FLIGHT, DSPY_TRIO_MAX_QUEUED, DSPY_TRIO_DRAIN_TIMEOUT, DSPY_TRIO_ADAPTER
    DSPY_TRIO_REDIS_URL   redis://host:port/db shared by every worker and replica (quota, cool-down, cancel)
    DSPY_TRIO_CLUSTER_SECRET  cluster.secret: the key of the owners' digests sent through Redis

Every value is checked when it is loaded (finite numbers, ranges, integers, http(s) URLs, keys that can
be sent in a header, params that are request parameters, keys the provider has): a bad one is a
ConfigError naming the TOML key or the environment variable and the value, never a failure at run time.
A variable sets a key of the default LM's table, so it is checked like that key in the file.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from typing import Any

import attrs

from ._cluster_config import ClusterConfig, shown_url
from ._errors import ConfigError
from ._lm_config import SHARED_KEYS, LMConfig, check_params, lm_from_table, not_a_key_of
from ._providers import PROVIDERS, keys_of
from ._tables import default_of, shallow

# Variables that set a key of the default LM's table, and those that set a key of a nested table.
_LM_KEYS = (
    ("LM_PROVIDER", "provider"),
    ("LM_MODEL", "model"),
    ("LM_API_BASE", "api_base"),
    ("LM_PARAMS", "params"),
    ("LM_STREAM_UPSTREAM", "stream_upstream"),
)
_LM_NESTED_KEYS = (
    ("LM_TIMEOUT", "http", "read_timeout", float),
    ("LM_RPM", "rate_limit", "rpm", float),
    ("LM_TPM", "rate_limit", "tpm", float),
    ("LM_MAX_ATTEMPTS", "retry", "max_attempts", int),
    ("LM_ATTEMPT_TIMEOUT", "timeouts", "attempt", float),
)
_ENGINE_KEYS = (
    ("DSPY_TRIO_MAX_IN_FLIGHT", "max_in_flight", int),
    ("DSPY_TRIO_MAX_QUEUED", "max_queued", int),
    ("DSPY_TRIO_DRAIN_TIMEOUT", "drain_timeout", float),
)


# A config file is a few KiB; reading stops past this, so a path to /dev/zero, /dev/urandom or an endless
# pipe is an error, not memory growing until the OOM killer ends the process. (Pipes stay allowed:
# ``--config <(...)``.)
MAX_CONFIG_BYTES = 1 << 20


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The TOML file at ``path``. Blocks on the read.

    Raises:
        ConfigError: it cannot be read, is not UTF-8, or is not TOML.
    """
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"cannot read config file {str(path)!r}: larger than {MAX_CONFIG_BYTES >> 20} MiB (a config "
                "file is a few KiB: is it the right path?)"
            )
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:  # TOML is UTF-8
        raise ConfigError(
            f"cannot read config file {str(path)!r}: not UTF-8 (byte {exc.object[exc.start]:#04x} at "
            f"position {exc.start})"
        ) from exc
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc}") from exc


def key_from_env(data: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """The file's structure with ``LM_API_KEY`` in place of the default LM's ``api_key_env``: the
    environment overrides the default LM, so a variable the file names need not be set then."""
    lms = data.get("lms")
    table = lms.get("default") if isinstance(lms, Mapping) else None
    if not env.get("LM_API_KEY") or not isinstance(table, Mapping) or "api_key_env" not in table:
        return data
    table = {k: v for k, v in table.items() if k != "api_key_env"} | {"api_key": env["LM_API_KEY"]}
    return {**data, "lms": {**lms, "default": table}}  # type: ignore[dict-item]


def _lm_table(lm: LMConfig) -> dict[str, Any]:
    """``lm`` as the flat table it could have been built from (nested values as values)."""
    shared = {key: value for key, value in shallow(lm).items() if key != "settings"}
    return {"provider": lm.provider, **shared, **shallow(lm.settings)}


def default_lm_from_env(base: LMConfig, env: Mapping[str, str]) -> LMConfig | None:
    """``base`` with the ``LM_*`` variables applied, or None when none is set.

    Raises:
        ConfigError: naming the variable and its value (never the key's).
    """
    # key -> the variable that set it, for the error that names it (the key's value is never shown)
    names = {key: f"{variable}={env[variable]!r}" for variable, key in _LM_KEYS if env.get(variable)}
    if env.get("LM_API_KEY"):
        names["api_key"] = "LM_API_KEY"
    table = _lm_table(base)
    top: dict[str, Any] = {}
    if env.get("LM_PROVIDER"):
        top["provider"] = env["LM_PROVIDER"]
    elif env.get("LM_API_BASE") and base.provider == "simulated":
        top["provider"] = "openai"  # no real provider chosen yet: a base URL means an OpenAI-compatible one
    for variable, key in (("LM_MODEL", "model"), ("LM_API_BASE", "api_base")):
        if env.get(variable):
            top[key] = env[variable]
    provider = top.get("provider", base.provider)
    kind = PROVIDERS.get(provider)
    if provider != base.provider:
        if "model" not in top:
            why = "LM_PROVIDER" if env.get("LM_PROVIDER") else "LM_API_BASE without LM_PROVIDER"
            raise ConfigError(f"{why} makes the default LM provider {provider}, which needs LM_MODEL")
        # The file's provider keys belonged to the other provider: never send its key or base to this
        # one, and drop what this one does not have.
        kept = SHARED_KEYS | ((keys_of(kind) if kind else set()) - {"api_key", "api_base"})
        table = {key: value for key, value in table.items() if key in kept}
    if env.get("LM_API_KEY"):
        if provider == "simulated":
            raise ConfigError(
                "LM_API_KEY is set but the default LM is the built-in simulated one: set LM_API_BASE (an "
                "OpenAI-compatible server) or LM_PROVIDER (openai, anthropic, dspy)"
            )
        top["api_key"] = env["LM_API_KEY"]
    elif table.get("api_key") is None and kind and kind.key_env and env.get(kind.key_env):
        top["api_key"] = env[kind.key_env]
        names["api_key"] = kind.key_env
    if (params := _params_from_env(table["params"], env)) is not None:
        top["params"] = params
    if env.get("LM_STREAM_UPSTREAM"):
        top["stream_upstream"] = flag(env, "LM_STREAM_UPSTREAM")
    for variable, key, field, number_type in _LM_NESTED_KEYS:
        if env.get(variable):
            shown = f"{variable}={env[variable]!r}"
            current: Any = top.get(key, table.get(key))
            if current is None and key not in SHARED_KEYS:
                if kind is None or key not in keys_of(kind):
                    raise ConfigError(f"{shown}: {not_a_key_of(f'{key}.{field}', key, provider)}")
                current = default_of(kind, key)
            try:
                top[key] = attrs.evolve(current, **{field: number(env, variable, number_type)})
            except ConfigError as exc:
                raise ConfigError(f"{shown}: {exc.message}") from exc
    if not top:
        return None
    return lm_from_table({**table, **top}, "LM_*", names=names)


def _params_from_env(base: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, Any] | None:
    """``base`` with ``LM_PARAMS`` and ``LM_MAX_TOKENS`` applied, or None when that changes nothing."""
    params = dict(base)
    if env.get("LM_PARAMS"):
        try:
            extra = json.loads(env["LM_PARAMS"])
        except ValueError as exc:
            raise ConfigError(f"LM_PARAMS must be a JSON object, got {env['LM_PARAMS']!r}") from exc
        if not isinstance(extra, dict):
            raise ConfigError(f"LM_PARAMS must be a JSON object, got {env['LM_PARAMS']!r}")
        check_params(extra, "LM_PARAMS")
        params.update(extra)
    if env.get("LM_MAX_TOKENS"):
        tokens = number(env, "LM_MAX_TOKENS", int)
        if tokens < 1:
            raise ConfigError(f"LM_MAX_TOKENS must be a positive integer, got {env['LM_MAX_TOKENS']!r}")
        params["max_tokens"] = int(tokens)
    return params if params != dict(base) else None


def engine_limits_from_env(env: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The engine's limits and default adapter set by ``DSPY_TRIO_*`` / ``LM_ADAPTER``, and for each the
    variable that set it (``VARIABLE='value'``)."""
    changes: dict[str, Any] = {}
    names: dict[str, str] = {}
    for variable, field, number_type in _ENGINE_KEYS:
        if env.get(variable):
            changes[field] = number(env, variable, number_type)
            names[field] = f"{variable}={env[variable]!r}"
    for variable in ("DSPY_TRIO_ADAPTER", "LM_ADAPTER"):
        if env.get(variable):
            changes["adapter"] = env[variable]
            names["adapter"] = f"{variable}={env[variable]!r}"
    return changes, names


def cluster_from_env(cluster: ClusterConfig, env: Mapping[str, str]) -> ClusterConfig:
    """``cluster`` with ``DSPY_TRIO_REDIS_URL`` and ``DSPY_TRIO_CLUSTER_SECRET`` applied.

    Raises:
        ConfigError: naming the variable (a URL without its password; never the secret).
    """
    for variable, setting in (("DSPY_TRIO_REDIS_URL", "redis_url"), ("DSPY_TRIO_CLUSTER_SECRET", "secret")):
        if value := env.get(variable):
            try:
                cluster = attrs.evolve(cluster, **{setting: value})  # type: ignore[arg-type]
            except ConfigError as exc:
                shown = f"={shown_url(value)!r}" if setting == "redis_url" else ""
                raise ConfigError(f"{variable}{shown}: {exc.message}") from exc
    return cluster


def flag(env: Mapping[str, str], key: str) -> bool:
    """The variable ``key`` as a boolean (``1``/``0``, ``true``/``false``, ``yes``/``no``, ``on``/``off``)."""
    value = env[key].strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{key} must be true or false, got {env[key]!r}")


def number(env: Mapping[str, str], key: str, kind: type[int] | type[float]) -> float:
    """The variable ``key`` as a number of ``kind``."""
    try:
        return kind(env[key])
    except ValueError as exc:
        raise ConfigError(f"{key} must be a number, got {env[key]!r}") from exc
