"""Everything an engine needs, in one frozen value, with named constructors for TOML files and the
environment.

Every policy number of the engine (limits, queue bound, drain timeout) lives here, in one object;
time limits of single requests belong to the callers' cancel scopes instead. The parts have their own
modules: an LM's configuration (``_lm_config``, and each provider's settings in ``engine/lm/``), a
program's (``_program_spec``), the stream options (``_stream_options``), the cluster's
(``_cluster_config``); reading the file and the environment is ``_env``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import attrs

from ._cluster_config import ClusterConfig
from ._env import cluster_from_env, default_lm_from_env, engine_limits_from_env, key_from_env, read_toml
from ._errors import ConfigError
from ._lm_config import LMConfig
from ._program_spec import ADAPTERS, AdapterName, ProgramSpec
from ._stream_options import StreamOptions
from ._tables import build, copy_mapping, one_of, shallow
from ._validate import non_negative, non_negative_int, positive_int


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
        cluster: State shared with other workers and replicas through Redis.
    """

    lms: Mapping[str, LMConfig] = attrs.field(factory=_default_lms, converter=copy_mapping, hash=False)
    programs: Mapping[str, ProgramSpec] = attrs.field(
        default=attrs.Factory(_programs_of, takes_self=True), converter=copy_mapping, hash=False
    )
    max_in_flight: int = attrs.field(default=512, validator=positive_int)
    max_queued: int = attrs.field(default=2048, validator=non_negative_int)
    drain_timeout: float = attrs.field(default=10.0, validator=non_negative)
    adapter: AdapterName = attrs.field(default="chat", validator=one_of(ADAPTERS))
    dspy_cache: bool = False
    stream: StreamOptions = attrs.field(factory=StreamOptions)
    log_text: bool = False
    cluster: ClusterConfig = attrs.field(factory=ClusterConfig)

    def __attrs_post_init__(self) -> None:
        for name, spec in self.programs.items():
            if spec.lm not in self.lms:
                raise ConfigError(f"program {name!r} uses LM {spec.lm!r}, which is not configured")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, env: Mapping[str, str] | None = None) -> EngineConfig:
        """Build from the structure of a TOML file: ``[engine]``, ``[stream]``, ``[lms.NAME]`` (with its
        nested tables), ``[programs.NAME]``, ``[cluster]``. ``env`` is where ``api_key_env`` names are
        looked up."""
        unknown = set(data) - {"engine", "stream", "lms", "programs", "cluster"}
        if unknown:
            raise ConfigError(f"unknown config section(s): {', '.join(sorted(unknown))}")
        values: dict[str, Any] = dict(data.get("engine", {}))
        if "stream" in data:
            values["stream"] = StreamOptions.from_mapping(data["stream"])
        if "cluster" in data:
            values["cluster"] = build(ClusterConfig, data["cluster"], "cluster")
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
        return build(cls, values, "engine")

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None) -> EngineConfig:
        """Read a TOML config file. Blocks on the read."""
        return cls.from_mapping(read_toml(path), env=env)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> EngineConfig:
        """Read ``DSPY_TRIO_CONFIG`` (if set), then let the environment override the default LM and the
        engine's limits (the variables: ``dspy_trio.engine._env``). With nothing set, the default LM is
        the built-in simulated one. Blocks on the file's read."""
        env = os.environ if env is None else env
        path = env.get("DSPY_TRIO_CONFIG")
        config = cls.from_mapping(key_from_env(read_toml(path), env), env=env) if path else cls()
        lms = dict(config.lms)
        if (default := default_lm_from_env(config.lms.get("default", LMConfig()), env)) is not None:
            lms["default"] = default
        changes, names = engine_limits_from_env(env)
        changes["lms"] = lms
        cluster = cluster_from_env(config.cluster, env)
        if cluster is not config.cluster:
            changes["cluster"] = cluster
        return build(EngineConfig, {**shallow(config), **changes}, "DSPY_TRIO_*", names=names)
