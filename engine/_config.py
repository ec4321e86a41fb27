"""Engine configuration: frozen values with named constructors for the environment and TOML files.

Every policy number of the engine (limits, queue bound, drain timeout) lives here, in one object;
time limits of single requests belong to the callers' cancel scopes instead. An LM's policies are the
frozen values the engine runs them with, nested as they are (``[lms.NAME.retry]`` is a
:class:`RetryPolicy`), not copied into flat fields.

Environment (read by :meth:`EngineConfig.from_env`; each overrides the ``default`` LM of the file)::

    DSPY_TRIO_CONFIG      path of a TOML file read first (see docs/configuration.md)
    LM_PROVIDER           simulated | openai | anthropic | dspy (default: the file's provider; else openai
                          if LM_API_BASE is set, else simulated). Switching the provider drops the file's
                          api_key and api_base: they belonged to the other provider.
    LM_MODEL              model name, e.g. gpt-4o-mini, or openai/gpt-4o-mini for the dspy provider
    LM_API_BASE           API root of an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1
    LM_API_KEY            API key; wins over the file's api_key / api_key_env (an LM without a key of its
                          own falls back to OPENAI_API_KEY / ANTHROPIC_API_KEY for those providers)
    LM_ADAPTER            chat | json: the default DSPy adapter (same as DSPY_TRIO_ADAPTER)
    LM_MAX_TOKENS         output-token cap sent with every call, a positive integer (default 1024 for the
                          HTTP providers)
    LM_PARAMS             request parameters as a JSON object, e.g. '{"temperature": 0.2}'
    LM_STREAM_UPSTREAM    true | false: send non-streamed calls upstream as streams (stream_upstream)

Every value is checked when it is loaded (finite numbers, ranges, integers, http(s) URLs, keys that can
be sent in a header, params that are request parameters): a bad one is a ConfigError naming the TOML key
or the environment variable and the value, never a failure at run time.
    LM_TIMEOUT            http.read_timeout: seconds the provider may stay silent within one call (120)
    LM_RPM, LM_TPM        rate_limit.rpm / rate_limit.tpm: requests / tokens per minute (unlimited)
    LM_MAX_ATTEMPTS       retry.max_attempts: attempts per LM call, retries included (3)
    LM_ATTEMPT_TIMEOUT    timeouts.attempt: seconds one attempt may take in total (none)
    DSPY_TRIO_MAX_IN_FLIGHT, DSPY_TRIO_MAX_QUEUED, DSPY_TRIO_DRAIN_TIMEOUT, DSPY_TRIO_ADAPTER
    DSPY_TRIO_REDIS_URL   redis://host:port/db shared by every worker and replica (quota, cool-down, cancel)
    DSPY_TRIO_CLUSTER_SECRET  cluster.secret: the key of the owners' digests sent through Redis
"""

from __future__ import annotations

import ipaddress
import json
import os
import tomllib
from collections.abc import Mapping
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import attrs

from . import _fallback_config
from ._adaptive import AdaptiveSettings
from ._breaker import BreakerSettings
from ._errors import ConfigError
from ._lm_factory import PROVIDERS
from ._retry import RetryPolicy
from ._upstream import UpstreamPolicy
from ._validate import (
    flag,
    json_compliant,
    non_negative,
    non_negative_int,
    optional,
    optional_positive,
    positive,
    positive_int,
)
from .lm import HTTPSettings

Backpressure = Literal["block", "timeout", "drop"]
AdapterName = Literal["chat", "json"]
ModuleKind = Literal["predict", "chain_of_thought"]

ADAPTERS: tuple[AdapterName, ...] = ("chat", "json")


def _one_of(options: tuple[str, ...]) -> Any:
    def check(instance: object, attribute: attrs.Attribute[Any], value: str) -> None:
        if value not in options:
            raise ConfigError(f"{attribute.name} must be one of {', '.join(options)}; got {value!r}")

    return check


def _registered(instance: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if value not in PROVIDERS:
        raise ConfigError(f"{attribute.name} must be one of {', '.join(PROVIDERS)}; got {value!r}")


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


# The nested tables of an LM and the frozen value each one is.
_NESTED: dict[str, type[Any]] = {
    "http": HTTPSettings,
    "timeouts": CallTimeouts,
    "rate_limit": RateLimit,
    "retry": RetryPolicy,
    "adaptive": AdaptiveSettings,
    "breaker": BreakerSettings,
}

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
# prompt (``messages``), the model, or the framing of the answer (``stream``).
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


def _copy_mapping(value: Any) -> Any:
    return dict(value) if isinstance(value, Mapping) else value


def _http_url(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    """An http(s) URL a connection can be opened to: a host (an IPv6 address in brackets must be one)
    and, if given, a port from 1 to 65535. What ``urlsplit`` raises on (an unclosed ``[``) and what it
    only raises on later (``.port``) are refused here, so a bad URL is a ConfigError, not a traceback at
    the first call."""
    if not isinstance(value, str):
        raise ConfigError(f"{attribute.name} must be a URL, got {value!r}")
    problem = None
    try:
        parts = urlsplit(value)
        port = parts.port  # ValueError: not a number, or out of 0-65535
        host = parts.hostname
    except ValueError as exc:
        problem = str(exc)
    else:
        if parts.scheme not in ("http", "https") or not parts.netloc or any(c.isspace() for c in value):
            problem = "not an http:// or https:// URL"
        elif not host:
            problem = "no host"
        elif port == 0:
            problem = "port 0"
        elif ":" in host:
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                problem = f"{host!r} in brackets is not an IPv6 address"
    if problem is not None:
        raise ConfigError(
            f"{attribute.name} must be an http:// or https:// URL, e.g. http://127.0.0.1:8000/v1;"
            f" got {value!r} ({problem})"
        )


def _header_value(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    # The key itself is never shown: only what is wrong with it.
    if not isinstance(value, str):
        raise ConfigError(f"{attribute.name} must be a string")
    if value != value.strip():
        raise ConfigError(
            f"{attribute.name} has leading or trailing whitespace (a newline from a secret file?)"
        )
    if not (value.isascii() and value.isprintable()):
        raise ConfigError(f"{attribute.name} has characters that cannot be sent in an HTTP header")


def _optional_secret(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    # The secret itself is never shown: only what is wrong with it.
    if value is None:
        return
    if not isinstance(value, str) or len(value) < 16:
        raise ConfigError(f"{attribute.name} must be a string of at least 16 characters")
    if value != value.strip():
        raise ConfigError(
            f"{attribute.name} has leading or trailing whitespace (a newline from a secret file?)"
        )


def _table(kind: type[Any]) -> Any:
    def check(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
        if not isinstance(value, kind):
            raise ConfigError(f"{attribute.name} must be a table ({kind.__name__}), got {value!r}")

    return check


@attrs.frozen
class LMConfig:
    """One upstream language model and the policies its calls run under.

    Attributes:
        provider: A registered provider: ``simulated`` (built in, no network), ``openai`` (any
            OpenAI-compatible endpoint, Trio-native), ``anthropic`` (Anthropic's Messages API,
            Trio-native) or ``dspy`` (any stock ``dspy.LM`` model string, run in worker threads).
        model: The model name.
        api_base: API root for ``openai`` (required), ``anthropic`` (default its public API) and
            optionally ``dspy``.
        api_key: API key; never shown in ``repr``.
        params: Default request parameters (``temperature``, ``max_tokens``, ...). The HTTP providers
            send ``max_tokens = 1024`` unless it is set here.
        http: Connection policy of the HTTP providers: connect / read / write / pool timeouts,
            connections, the check for connections the provider closed.
        timeouts: Per-attempt time limits (attempt, first token, stall).
        rate_limit: Requests and tokens per minute.
        retry: Retries of retryable failures (attempts, backoff, budget and its window).
        adaptive: An AIMD limit on concurrent calls to this upstream; None for none.
        threads: Worker threads, i.e. concurrent calls (``dspy``).
        stream_upstream: ``openai`` and ``anthropic``: send non-streamed calls upstream as streams
            and assemble the answer, so a cancelled call closes a stream: self-hosted servers
            (llama.cpp) stop generating then, but finish a plain request whose client left. Off by
            default: it costs the engine ~0.08 ms of CPU a token (``benchmarks/stream_upstream.py``).
        first_token_delay, token_delay, words_per_field: Pacing of the ``simulated`` LM.
        fallbacks: Names of other LMs tried in order when a call to this one fails with a retryable
            upstream error after its own retries (5xx, 529, 429, connection failures, timeouts), or at
            once when its breaker is open; each with its own limits, retries and breaker, inside the
            call's deadline. A stream falls back only before its first delta.
        fallback_on_context_window: Also fall back when the prompt does not fit this LM's context
            window (to a fallback with a larger one).
        breaker: The circuit breaker; None: the defaults when the LM has fallbacks or is one, else
            none (``BreakerSettings(enabled=False)`` turns it off).
    """

    provider: str = attrs.field(default="simulated", validator=_registered)
    model: str = attrs.field(default="simulated/lm", validator=attrs.validators.instance_of(str))
    api_base: str | None = attrs.field(default=None, validator=optional(_http_url))
    api_key: str | None = attrs.field(default=None, repr=False, validator=optional(_header_value))
    params: Mapping[str, Any] = attrs.field(
        factory=dict, converter=_copy_mapping, validator=_params, hash=False
    )
    http: HTTPSettings = attrs.field(factory=HTTPSettings, validator=_table(HTTPSettings))
    timeouts: CallTimeouts = attrs.field(factory=CallTimeouts, validator=_table(CallTimeouts))
    rate_limit: RateLimit = attrs.field(factory=RateLimit, validator=_table(RateLimit))
    retry: RetryPolicy = attrs.field(factory=RetryPolicy, validator=_table(RetryPolicy))
    adaptive: AdaptiveSettings | None = attrs.field(
        default=None, validator=optional(_table(AdaptiveSettings))
    )
    threads: int = attrs.field(default=32, validator=positive_int)
    stream_upstream: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    first_token_delay: float = attrs.field(default=0.05, validator=non_negative)
    token_delay: float = attrs.field(default=0.01, validator=non_negative)
    words_per_field: int = attrs.field(default=16, validator=positive_int)
    fallbacks: tuple[str, ...] = attrs.field(
        default=(), converter=_fallback_config.to_names, validator=_fallback_config.names
    )
    fallback_on_context_window: bool = attrs.field(default=False, validator=flag)
    breaker: BreakerSettings | None = attrs.field(default=None, validator=_fallback_config.breaker_table)

    def __attrs_post_init__(self) -> None:
        if PROVIDERS[self.provider].needs_api_base and not self.api_base:
            raise ConfigError(
                f"an LM of provider {self.provider!r} needs api_base (LM_API_BASE), e.g. https://api.openai.com/v1"
            )
        if self.stream_upstream and self.provider not in ("openai", "anthropic"):
            raise ConfigError(
                f"stream_upstream (LM_STREAM_UPSTREAM) applies to the openai and anthropic providers, "
                f"not {self.provider}"
            )

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

    @classmethod
    def from_mapping(
        cls, data: Mapping[str, Any], *, where: str = "lm", env: Mapping[str, str] | None = None
    ) -> LMConfig:
        """Build from a TOML table. Nested tables (``http``, ``timeouts``, ``rate_limit``, ``retry``,
        ``adaptive``) become their frozen values; ``api_key_env`` names an environment variable
        holding the key, which must be set."""
        values = dict(data)
        env = os.environ if env is None else env
        if env_name := values.pop("api_key_env", None):
            key = env.get(str(env_name)) or os.environ.get(str(env_name))
            if not key:
                raise ConfigError(f"{where}: api_key_env names {env_name}, which is not set")
            values.setdefault("api_key", key)
        for name, kind in _NESTED.items():
            if name in values and isinstance(values[name], Mapping):
                values[name] = _build(kind, dict(values[name]), f"{where}.{name}")
            elif name in values and not isinstance(values[name], kind):
                raise ConfigError(f"{where}.{name} must be a table, got {values[name]!r}")
        moved = sorted(set(values) & set(_MOVED))
        if moved:
            hints = ", ".join(f"{key} -> {_MOVED[key]}" for key in moved)
            raise ConfigError(f"{where}: these keys moved into nested tables: {hints}")
        return _build(cls, values, where)


@attrs.frozen
class ProgramSpec:
    """How to build one served program.

    Attributes:
        source: A signature string (``"question -> answer"``), a ``dspy.Module`` instance, an import path
            ``"package.module:attribute"`` (a Module instance or class, or a Signature class), or the
            directory of a program saved with ``program.save(path, save_program=True)``.
        module: For signature sources: ``predict`` or ``chain_of_thought``.
        lm: The name of the LM (a key of ``EngineConfig.lms``) the program calls.
        adapter: ``chat`` or ``json``; None uses the engine's default.
        state: A JSON file written by ``program.save("x.json")`` to load into the built program.
        allow_pickle: Allow loading a saved-program directory (cloudpickle: trusted files only).
    """

    source: Any
    module: ModuleKind = attrs.field(default="predict", validator=_one_of(("predict", "chain_of_thought")))
    lm: str = "default"
    adapter: AdapterName | None = attrs.field(
        default=None, validator=attrs.validators.optional(_one_of(ADAPTERS))
    )
    state: str | None = None
    allow_pickle: bool = False

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, where: str = "program") -> ProgramSpec:
        """Build from a TOML table."""
        return _build(cls, dict(data), where)


@attrs.frozen
class StreamOptions:
    """How a stream treats its consumer. Defaults come from ``EngineConfig.stream``; each stream may
    override them.

    Attributes:
        backpressure: ``block`` (the producer, and so the upstream read, waits for the consumer),
            ``timeout`` (like block, but a consumer that takes nothing for ``consumer_timeout`` seconds
            ends the stream with ``SlowConsumerError``), or ``drop`` (never wait; drop the oldest deltas).
        buffer_size: Events buffered between producer and consumer.
        consumer_timeout: Seconds without progress before ``timeout`` gives up on the consumer.
        coalesce_chars: Merge consecutive deltas of a field up to this many characters (0: no limit
            when ``coalesce_ms`` is set, else no merging).
        coalesce_ms: Hold the newest delta of a field up to this long for more text to merge in.
    """

    backpressure: Backpressure = attrs.field(default="block", validator=_one_of(("block", "timeout", "drop")))
    buffer_size: int = attrs.field(default=64, validator=positive_int)
    consumer_timeout: float = attrs.field(default=30.0, validator=positive)
    coalesce_chars: int = attrs.field(default=0, validator=non_negative_int)
    coalesce_ms: float = attrs.field(default=0.0, validator=non_negative)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, where: str = "stream") -> StreamOptions:
        """Build from a TOML table."""
        return _build(cls, dict(data), where)


def _redis_url(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    # The URL is never shown: it may carry a password.
    parts = urlsplit(value) if isinstance(value, str) else None
    if parts is None or parts.scheme not in ("redis", "rediss", "unix") or not (parts.netloc or parts.path):
        raise ConfigError(
            f"{attribute.name} must be a redis://, rediss:// or unix:// URL, e.g. redis://127.0.0.1:6379/0"
        )


@attrs.frozen
class ClusterConfig:
    """State shared by every worker and replica through Redis (``[cluster]`` in TOML).

    Attributes:
        redis_url: ``redis://host:port/db``; None keeps every limit per process.
        key_prefix: Prefix of every Redis key and channel (one per deployment sharing a Redis).
        call_timeout: Seconds one Redis call may take (always also within the request's deadline);
            past it the process falls back to local limits until Redis answers again.
        heartbeat_interval: Seconds between heartbeats (how the processes sharing a quota are counted).
        secret: The key of the HMAC under which an owner (an API key) travels through Redis with a
            cancel; the same in every process of the deployment, at least 16 characters (e.g.
            ``openssl rand -hex 32``). Unset, the key is derived from
            ``key_prefix``, which anyone reading Redis knows: a warning says so at start.
    """

    redis_url: str | None = attrs.field(default=None, repr=False, validator=optional(_redis_url))
    key_prefix: str = "dspy-trio"
    call_timeout: float = attrs.field(default=0.5, validator=positive)
    heartbeat_interval: float = attrs.field(default=1.0, validator=positive)
    secret: str | None = attrs.field(default=None, repr=False, validator=_optional_secret)


def _default_lms() -> dict[str, LMConfig]:
    return {"default": LMConfig()}


def _default_programs(lms: Mapping[str, LMConfig]) -> dict[str, ProgramSpec]:
    """The implicit ``default`` program: ``question -> answer`` on the LM called ``default``, or on the
    only LM there is; none when several LMs are configured and none is called ``default``."""
    if "default" in lms:
        return {"default": ProgramSpec("question -> answer")}
    if len(lms) == 1:
        return {"default": ProgramSpec("question -> answer", lm=next(iter(lms)))}
    return {}


def _programs_of(config: EngineConfig) -> dict[str, ProgramSpec]:
    return _default_programs(config.lms)


@attrs.frozen
class EngineConfig:
    """Everything an engine needs: its LMs, its programs and its policies.

    Attributes:
        lms: Upstream LMs by name; programs refer to them by name.
        programs: Served programs by name. ``default`` is ``"question -> answer"`` unless configured
            (on the LM called ``default``, or on the only LM there is).
        max_in_flight: Requests running at once (each may make several LM calls).
        max_queued: Requests waiting for a slot; beyond that admission fails at once.
        drain_timeout: Seconds a closing engine lets in-flight requests finish before cancelling them.
        adapter: The default DSPy adapter, ``chat`` or ``json``.
        dspy_cache: Use DSPy's cache for LM calls (off for served programs: identical requests
            should reach the model).
        stream: Default stream options (backpressure, buffer, coalescing).
        log_text: Put inputs and outputs in the request log lines (off: privacy by default).
    """

    lms: Mapping[str, LMConfig] = attrs.field(factory=_default_lms, converter=_copy_mapping, hash=False)
    programs: Mapping[str, ProgramSpec] = attrs.field(
        default=attrs.Factory(_programs_of, takes_self=True), converter=_copy_mapping, hash=False
    )
    max_in_flight: int = attrs.field(default=512, validator=positive_int)
    max_queued: int = attrs.field(default=2048, validator=non_negative_int)
    drain_timeout: float = attrs.field(default=10.0, validator=non_negative)
    adapter: AdapterName = attrs.field(default="chat", validator=_one_of(ADAPTERS))
    dspy_cache: bool = False
    stream: StreamOptions = attrs.field(factory=StreamOptions)
    log_text: bool = False
    cluster: ClusterConfig = attrs.field(factory=ClusterConfig)

    def __attrs_post_init__(self) -> None:
        for name, spec in self.programs.items():
            if spec.lm not in self.lms:
                raise ConfigError(f"program {name!r} uses LM {spec.lm!r}, which is not configured")
        _fallback_config.check_fallbacks(self.lms)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, env: Mapping[str, str] | None = None) -> EngineConfig:
        """Build from the structure of a TOML file: ``[engine]``, ``[stream]``, ``[lms.NAME]`` (with its
        nested tables), ``[programs.NAME]``. ``env`` is where ``api_key_env`` names are looked up."""
        unknown = set(data) - {"engine", "stream", "lms", "programs", "cluster"}
        if unknown:
            raise ConfigError(f"unknown config section(s): {', '.join(sorted(unknown))}")
        values: dict[str, Any] = dict(data.get("engine", {}))
        if "stream" in data:
            values["stream"] = StreamOptions.from_mapping(data["stream"])
        if "cluster" in data:
            values["cluster"] = _build(ClusterConfig, dict(data["cluster"]), "cluster")
        if "lms" in data:
            values["lms"] = {
                name: LMConfig.from_mapping(table, where=f"lms.{name}", env=env)
                for name, table in data["lms"].items()
            }
        if "programs" in data:
            programs = {
                name: ProgramSpec.from_mapping(table, where=f"programs.{name}")
                for name, table in data["programs"].items()
            }
            values["programs"] = {**_default_programs(values.get("lms", _default_lms())), **programs}
        return _build(cls, values, "engine")

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None) -> EngineConfig:
        """Read a TOML config file."""
        return cls.from_mapping(_read_toml(path), env=env)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> EngineConfig:
        """Read ``DSPY_TRIO_CONFIG`` (if set), then let the environment override the default LM and the
        engine's limits. With nothing set, the default LM is the built-in simulated one."""
        env = os.environ if env is None else env
        path = env.get("DSPY_TRIO_CONFIG")
        config = cls.from_mapping(_key_from_env(_read_toml(path), env), env=env) if path else cls()
        lms = dict(config.lms)
        if (default := _default_lm_from_env(config.lms.get("default", LMConfig()), env)) is not None:
            lms["default"] = default

        engine_changes: dict[str, Any] = {"lms": lms}
        names: dict[str, str] = {}  # field -> the variable that set it, for the error that names it
        for key, field, kind in (
            ("DSPY_TRIO_MAX_IN_FLIGHT", "max_in_flight", int),
            ("DSPY_TRIO_MAX_QUEUED", "max_queued", int),
            ("DSPY_TRIO_DRAIN_TIMEOUT", "drain_timeout", float),
        ):
            if env.get(key):
                engine_changes[field] = _number(env, key, kind)
                names[field] = f"{key}={env[key]!r}"
        for key in ("DSPY_TRIO_ADAPTER", "LM_ADAPTER"):
            if env.get(key):
                engine_changes["adapter"] = env[key]
                names["adapter"] = f"{key}={env[key]!r}"
        cluster: ClusterConfig = config.cluster
        for key, setting in (("DSPY_TRIO_REDIS_URL", "redis_url"), ("DSPY_TRIO_CLUSTER_SECRET", "secret")):
            if value := env.get(key):
                try:
                    cluster = attrs.evolve(cluster, **{setting: value})  # type: ignore[arg-type]
                except ConfigError as exc:  # the secret is never shown, a URL without its password
                    shown = f"={_shown_url(value)!r}" if setting == "redis_url" else ""
                    raise ConfigError(f"{key}{shown}: {exc.message}") from exc
        if cluster is not config.cluster:
            engine_changes["cluster"] = cluster
        return _build(EngineConfig, {**_shallow(config), **engine_changes}, "DSPY_TRIO_*", names=names)


def _shown_url(url: str) -> str:
    """``url`` without a password, for an error message."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=f"{parts.username or ''}:***@{parts.netloc.rpartition('@')[2]}").geturl()


# A config file is a few KiB; reading stops past this, so a path to /dev/zero, /dev/urandom or an endless
# pipe is an error, not memory growing until the OOM killer ends the process. (Pipes stay allowed:
# ``--config <(...)``.)
MAX_CONFIG_BYTES = 1 << 20


def _read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
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


def _key_from_env(data: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """The file's structure with ``LM_API_KEY`` in place of the default LM's ``api_key_env``: the
    environment overrides the default LM, so a variable the file names need not be set then."""
    lms = data.get("lms")
    table = lms.get("default") if isinstance(lms, Mapping) else None
    if not env.get("LM_API_KEY") or not isinstance(table, Mapping) or "api_key_env" not in table:
        return data
    table = {k: v for k, v in table.items() if k != "api_key_env"} | {"api_key": env["LM_API_KEY"]}
    return {**data, "lms": {**lms, "default": table}}  # type: ignore[dict-item]


def _default_lm_from_env(base: LMConfig, env: Mapping[str, str]) -> LMConfig | None:
    """``base`` with the ``LM_*`` variables applied, or None when none is set."""
    top: dict[str, Any] = {}
    values = _shallow(base)
    # field -> the variable that set it, for the error that names it (the key's value is never shown)
    names = {
        field: f"{key}={env[key]!r}"
        for key, field in (
            ("LM_PROVIDER", "provider"),
            ("LM_MODEL", "model"),
            ("LM_API_BASE", "api_base"),
            ("LM_PARAMS", "params"),
            ("LM_STREAM_UPSTREAM", "stream_upstream"),
        )
        if env.get(key)
    }
    if env.get("LM_API_KEY"):
        names["api_key"] = "LM_API_KEY"
    if provider := env.get("LM_PROVIDER"):
        top["provider"] = provider
    elif env.get("LM_API_BASE") and base.provider == "simulated":
        top["provider"] = "openai"  # no real provider chosen yet: a base URL means an OpenAI-compatible one
    for key, field in (("LM_MODEL", "model"), ("LM_API_BASE", "api_base")):
        if env.get(key):
            top[field] = env[key]
    provider = top.get("provider", base.provider)
    if provider != base.provider:
        if "model" not in top:
            why = "LM_PROVIDER" if env.get("LM_PROVIDER") else "LM_API_BASE without LM_PROVIDER"
            raise ConfigError(f"{why} makes the default LM provider {provider}, which needs LM_MODEL")
        # The file's key and base belonged to the other provider: never send them to this one.
        values.update(api_key=None, api_base=None)
    spec = PROVIDERS.get(provider)
    if env.get("LM_API_KEY"):
        top["api_key"] = env["LM_API_KEY"]
    elif values["api_key"] is None and spec and spec.key_env and env.get(spec.key_env):
        top["api_key"] = env[spec.key_env]
    if provider == "simulated" and env.get("LM_API_KEY"):
        raise ConfigError(
            "LM_API_KEY is set but the default LM is the built-in simulated one: set LM_API_BASE (an "
            "OpenAI-compatible server) or LM_PROVIDER (openai, anthropic, dspy)"
        )
    params = dict(base.params)
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
        tokens = _number(env, "LM_MAX_TOKENS", int)
        if tokens < 1:
            raise ConfigError(f"LM_MAX_TOKENS must be a positive integer, got {env['LM_MAX_TOKENS']!r}")
        params["max_tokens"] = int(tokens)
    if params != dict(base.params):
        top["params"] = params
    if env.get("LM_STREAM_UPSTREAM"):
        top["stream_upstream"] = _flag(env, "LM_STREAM_UPSTREAM")
    for key, table, field, kind in (
        ("LM_TIMEOUT", "http", "read_timeout", float),
        ("LM_RPM", "rate_limit", "rpm", float),
        ("LM_TPM", "rate_limit", "tpm", float),
        ("LM_MAX_ATTEMPTS", "retry", "max_attempts", int),
        ("LM_ATTEMPT_TIMEOUT", "timeouts", "attempt", float),
    ):
        if env.get(key):
            try:
                top[table] = attrs.evolve(top.get(table, values[table]), **{field: _number(env, key, kind)})
            except ConfigError as exc:
                raise ConfigError(f"{key}={env[key]!r}: {exc.message}") from exc
    if not top:
        return None
    return _build(LMConfig, {**values, **top}, "LM_*", names=names)


def _shallow(value: Any) -> dict[str, Any]:
    return {field.name: getattr(value, field.name) for field in attrs.fields(type(value))}


def _flag(env: Mapping[str, str], key: str) -> bool:
    value = env[key].strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{key} must be true or false, got {env[key]!r}")


def _number(env: Mapping[str, str], key: str, kind: type[int] | type[float]) -> float:
    try:
        return kind(env[key])
    except ValueError as exc:
        raise ConfigError(f"{key} must be a number, got {env[key]!r}") from exc


_T = TypeVar("_T")


def _build(
    cls: type[_T], values: dict[str, Any], where: str, *, names: Mapping[str, str] | None = None
) -> _T:
    """``cls(**values)``; a ConfigError names the TOML key (``where`` + the field), or the variable
    that set the field (``names``: field -> ``VARIABLE='value'``)."""
    known = {field.name for field in attrs.fields(cls)}  # type: ignore[arg-type]
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    try:
        return cls(**values)
    except ConfigError as exc:
        # A field's own message starts with its name: join it to the table's, giving the TOML key.
        field = exc.message.split(" ", 1)[0].split(".", 1)[0]
        if names and field in names:
            raise ConfigError(f"{names[field]}: {exc.message}") from exc
        joiner = "." if field in known and not where.endswith("*") else ": "
        raise ConfigError(f"{where}{joiner}{exc.message}") from exc
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
