"""Engine configuration: frozen values with named constructors for the environment and TOML files.

Every policy number of the engine (limits, queue bound, drain timeout) lives here, in one object;
time limits of single requests belong to the callers' cancel scopes instead.

Environment (read by :meth:`EngineConfig.from_env`)::

    DSPY_TRIO_CONFIG      path of a TOML file read first (see README)
    LM_PROVIDER           simulated | openai | anthropic | dspy
                          (default: openai if LM_API_BASE is set, else simulated)
    LM_MODEL              model name, e.g. gpt-4o-mini, or openai/gpt-4o-mini for the dspy provider
    LM_API_BASE           API root of an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1
    LM_API_KEY            API key (falls back to OPENAI_API_KEY / ANTHROPIC_API_KEY for those providers)
    LM_TIMEOUT            seconds a provider may stay silent within one call (default 120)
    LM_RPM, LM_TPM        requests / tokens per minute allowed to the provider (default unlimited)
    LM_MAX_ATTEMPTS       attempts per LM call, retries included (default 3)
    LM_ATTEMPT_TIMEOUT    seconds one attempt may take in total (default none)
    DSPY_TRIO_MAX_IN_FLIGHT, DSPY_TRIO_MAX_QUEUED, DSPY_TRIO_DRAIN_TIMEOUT, DSPY_TRIO_ADAPTER
    DSPY_TRIO_REDIS_URL   redis://host:port/db shared by every worker and replica (quota, cool-down, cancel)
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import attrs

from ._adaptive import AdaptiveSettings
from ._errors import ConfigError
from ._retry import RetryPolicy
from ._upstream import UpstreamPolicy

Provider = Literal["simulated", "openai", "anthropic", "dspy"]
Backpressure = Literal["block", "timeout", "drop"]
AdapterName = Literal["chat", "json"]
ModuleKind = Literal["predict", "chain_of_thought"]

PROVIDERS: tuple[Provider, ...] = ("simulated", "openai", "anthropic", "dspy")
ADAPTERS: tuple[AdapterName, ...] = ("chat", "json")


def _positive(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{attribute.name} must be positive, got {value!r}")


def _non_negative(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value >= 0:
        raise ConfigError(f"{attribute.name} must not be negative, got {value!r}")


def _one_of(options: tuple[str, ...]) -> Any:
    def check(instance: object, attribute: attrs.Attribute[Any], value: str) -> None:
        if value not in options:
            raise ConfigError(f"{attribute.name} must be one of {', '.join(options)}; got {value!r}")

    return check


@attrs.frozen
class LMConfig:
    """One upstream language model.

    Attributes:
        provider: ``simulated`` (built in, no network), ``openai`` (any OpenAI-compatible endpoint,
            Trio-native), ``anthropic`` (Anthropic's Messages API, Trio-native) or ``dspy`` (any stock
            ``dspy.LM`` model string, run in worker threads).
        model: The model name.
        api_base: API root for ``openai`` (required), ``anthropic`` (default its public API) and
            optionally ``dspy``.
        api_key: API key; never shown in ``repr``.
        timeout: Seconds the provider may stay silent within one call.
        connect_timeout: Seconds to open a connection.
        max_connections: Connections to the provider (``openai``).
        threads: Worker threads, i.e. concurrent calls (``dspy``).
        first_token_delay, token_delay, words_per_field: Pacing of the ``simulated`` LM.
        params: Default request parameters (``temperature``, ``max_tokens``, ...).
        rpm, tpm: Requests and tokens per minute allowed to this upstream (None: unlimited).
        max_attempts, retry_base_delay, retry_max_delay, retry_budget: Retries of retryable failures
            (exponential backoff with full jitter, at most ``retry_budget`` of recent requests).
        attempt_timeout: Seconds one attempt may take; first_token_timeout and stall_timeout bound a
            stream's silence before its first chunk and between chunks.
        adaptive_concurrency, min_concurrency, max_concurrency, initial_concurrency: An AIMD limit on
            concurrent calls to this upstream.
    """

    provider: Provider = attrs.field(default="simulated", validator=_one_of(PROVIDERS))
    model: str = "simulated/lm"
    api_base: str | None = None
    api_key: str | None = attrs.field(default=None, repr=False)
    timeout: float = attrs.field(default=120.0, validator=_positive)
    connect_timeout: float = attrs.field(default=10.0, validator=_positive)
    max_connections: int = attrs.field(default=1024, validator=_positive)
    threads: int = attrs.field(default=32, validator=_positive)
    first_token_delay: float = attrs.field(default=0.05, validator=_non_negative)
    token_delay: float = attrs.field(default=0.01, validator=_non_negative)
    words_per_field: int = attrs.field(default=16, validator=_positive)
    params: Mapping[str, Any] = attrs.field(factory=dict)
    rpm: float | None = attrs.field(default=None, validator=attrs.validators.optional(_positive))
    tpm: float | None = attrs.field(default=None, validator=attrs.validators.optional(_positive))
    max_attempts: int = attrs.field(default=3, validator=_positive)
    retry_base_delay: float = attrs.field(default=0.25, validator=_non_negative)
    retry_max_delay: float = attrs.field(default=20.0, validator=_non_negative)
    retry_budget: float = attrs.field(default=0.2, validator=_non_negative)
    attempt_timeout: float | None = attrs.field(default=None, validator=attrs.validators.optional(_positive))
    first_token_timeout: float | None = attrs.field(
        default=None, validator=attrs.validators.optional(_positive)
    )
    stall_timeout: float | None = attrs.field(default=None, validator=attrs.validators.optional(_positive))
    adaptive_concurrency: bool = False
    min_concurrency: int = attrs.field(default=1, validator=_positive)
    max_concurrency: int = attrs.field(default=512, validator=_positive)
    initial_concurrency: int = attrs.field(default=16, validator=_positive)

    def policy(self) -> UpstreamPolicy:
        """The call policy (rate limits, retries, timeouts, adaptive concurrency) these values describe."""
        return UpstreamPolicy(
            rpm=self.rpm,
            tpm=self.tpm,
            retry=RetryPolicy(
                max_attempts=self.max_attempts,
                base_delay=self.retry_base_delay,
                max_delay=self.retry_max_delay,
                budget_ratio=self.retry_budget,
            ),
            attempt_timeout=self.attempt_timeout,
            first_token_timeout=self.first_token_timeout,
            stall_timeout=self.stall_timeout,
            adaptive=AdaptiveSettings(
                initial=self.initial_concurrency, minimum=self.min_concurrency, maximum=self.max_concurrency
            )
            if self.adaptive_concurrency
            else None,
        )

    def __attrs_post_init__(self) -> None:
        if self.provider == "openai" and not self.api_base:
            raise ConfigError("an openai LM needs api_base (LM_API_BASE), e.g. https://api.openai.com/v1")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, where: str = "lm") -> LMConfig:
        """Build from a TOML table; ``api_key_env`` names an environment variable holding the key."""
        values = dict(data)
        if env_name := values.pop("api_key_env", None):
            values.setdefault("api_key", os.environ.get(str(env_name)))
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
    buffer_size: int = attrs.field(default=64, validator=_positive)
    consumer_timeout: float = attrs.field(default=30.0, validator=_positive)
    coalesce_chars: int = attrs.field(default=0, validator=_non_negative)
    coalesce_ms: float = attrs.field(default=0.0, validator=_non_negative)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, where: str = "stream") -> StreamOptions:
        """Build from a TOML table."""
        return _build(cls, dict(data), where)


@attrs.frozen
class ClusterConfig:
    """State shared by every worker and replica through Redis (``[cluster]`` in TOML).

    Attributes:
        redis_url: ``redis://host:port/db``; None keeps every limit per process.
        key_prefix: Prefix of every Redis key and channel (one per deployment sharing a Redis).
        call_timeout: Seconds one Redis call may take (always also within the request's deadline);
            past it the process falls back to local limits until Redis answers again.
        heartbeat_interval: Seconds between heartbeats (how the processes sharing a quota are counted).
    """

    redis_url: str | None = attrs.field(default=None, repr=False)
    key_prefix: str = "dspy-trio"
    call_timeout: float = attrs.field(default=0.5, validator=_positive)
    heartbeat_interval: float = attrs.field(default=1.0, validator=_positive)


def _default_lms() -> dict[str, LMConfig]:
    return {"default": LMConfig()}


def _default_programs() -> dict[str, ProgramSpec]:
    return {"default": ProgramSpec("question -> answer")}


@attrs.frozen
class EngineConfig:
    """Everything an engine needs: its LMs, its programs and its policies.

    Attributes:
        lms: Upstream LMs by name; programs refer to them by name.
        programs: Served programs by name. ``default`` is ``"question -> answer"`` unless configured.
        max_in_flight: Requests running at once (each may make several LM calls).
        max_queued: Requests waiting for a slot; beyond that admission fails at once.
        drain_timeout: Seconds a closing engine lets in-flight requests finish before cancelling them.
        adapter: The default DSPy adapter, ``chat`` or ``json``.
        dspy_cache: Use DSPy's cache for LM calls (off for served programs: identical requests
            should reach the model).
        stream: Default stream options (backpressure, buffer, coalescing).
        log_text: Put inputs and outputs in the request log lines (off: privacy by default).
    """

    lms: Mapping[str, LMConfig] = attrs.field(factory=_default_lms)
    programs: Mapping[str, ProgramSpec] = attrs.field(factory=_default_programs)
    max_in_flight: int = attrs.field(default=512, validator=_positive)
    max_queued: int = attrs.field(default=2048, validator=_non_negative)
    drain_timeout: float = attrs.field(default=10.0, validator=_non_negative)
    adapter: AdapterName = attrs.field(default="chat", validator=_one_of(ADAPTERS))
    dspy_cache: bool = False
    stream: StreamOptions = attrs.field(factory=StreamOptions)
    log_text: bool = False
    cluster: ClusterConfig = attrs.field(factory=ClusterConfig)

    def __attrs_post_init__(self) -> None:
        for name, spec in self.programs.items():
            if spec.lm not in self.lms:
                raise ConfigError(f"program {name!r} uses LM {spec.lm!r}, which is not configured")

    @property
    def uses_simulated_lm(self) -> bool:
        return any(lm.provider == "simulated" for lm in self.lms.values())

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> EngineConfig:
        """Build from the structure of a TOML file: ``[engine]``, ``[stream]``, ``[lms.NAME]``,
        ``[programs.NAME]``."""
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
                name: LMConfig.from_mapping(table, where=f"lms.{name}") for name, table in data["lms"].items()
            }
        if "programs" in data:
            programs = {
                name: ProgramSpec.from_mapping(table, where=f"programs.{name}")
                for name, table in data["programs"].items()
            }
            values["programs"] = {**_default_programs(), **programs}
        return _build(cls, values, "engine")

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> EngineConfig:
        """Read a TOML config file."""
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {str(path)!r}: {exc}") from exc
        return cls.from_mapping(data)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> EngineConfig:
        """Read ``DSPY_TRIO_CONFIG`` (if set), then let the environment override the default LM and the
        engine's limits. With nothing set, the default LM is the built-in simulated one."""
        env = os.environ if env is None else env
        config = cls.from_toml(env["DSPY_TRIO_CONFIG"]) if env.get("DSPY_TRIO_CONFIG") else cls()

        lm_changes: dict[str, Any] = {}
        if provider := env.get("LM_PROVIDER"):
            lm_changes["provider"] = provider
        elif env.get("LM_API_BASE"):
            lm_changes["provider"] = "openai"
        for key, field in (("LM_MODEL", "model"), ("LM_API_BASE", "api_base")):
            if env.get(key):
                lm_changes[field] = env[key]
        provider = lm_changes.get("provider", config.lms.get("default", LMConfig()).provider)
        provider_key = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}.get(provider, "")
        api_key = env.get("LM_API_KEY") or env.get(provider_key)
        if api_key:
            lm_changes["api_key"] = api_key
        for key, field, kind in (
            ("LM_TIMEOUT", "timeout", float),
            ("LM_RPM", "rpm", float),
            ("LM_TPM", "tpm", float),
            ("LM_MAX_ATTEMPTS", "max_attempts", int),
            ("LM_ATTEMPT_TIMEOUT", "attempt_timeout", float),
        ):
            if env.get(key):
                lm_changes[field] = _number(env, key, kind)
        if lm_changes:
            base = config.lms.get("default", LMConfig())
            if lm_changes.get("provider", base.provider) != base.provider and "model" not in lm_changes:
                raise ConfigError(f"LM_PROVIDER={lm_changes['provider']} needs LM_MODEL")
            lms = {**config.lms, "default": _build(LMConfig, {**attrs.asdict(base), **lm_changes}, "LM_*")}
            config = attrs.evolve(config, lms=lms)

        engine_changes: dict[str, Any] = {}
        for key, field, kind in (
            ("DSPY_TRIO_MAX_IN_FLIGHT", "max_in_flight", int),
            ("DSPY_TRIO_MAX_QUEUED", "max_queued", int),
            ("DSPY_TRIO_DRAIN_TIMEOUT", "drain_timeout", float),
        ):
            if env.get(key):
                engine_changes[field] = _number(env, key, kind)
        if env.get("DSPY_TRIO_ADAPTER"):
            engine_changes["adapter"] = env["DSPY_TRIO_ADAPTER"]
        if env.get("DSPY_TRIO_REDIS_URL"):
            engine_changes["cluster"] = attrs.evolve(config.cluster, redis_url=env["DSPY_TRIO_REDIS_URL"])
        return _build(EngineConfig, {**_shallow(config), **engine_changes}, "DSPY_TRIO_*")


def _shallow(config: EngineConfig) -> dict[str, Any]:
    return {field.name: getattr(config, field.name) for field in attrs.fields(EngineConfig)}


def _number(env: Mapping[str, str], key: str, kind: type[int] | type[float]) -> float:
    try:
        return kind(env[key])
    except ValueError as exc:
        raise ConfigError(f"{key} must be a number, got {env[key]!r}") from exc


_T = TypeVar("_T")


def _build(cls: type[_T], values: dict[str, Any], where: str) -> _T:
    known = {field.name for field in attrs.fields(cls)}  # type: ignore[arg-type]
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
