"""What ``dspy-trio serve`` and ``predict`` check, and say, before they start.

A user's mistake must surface before anything listens, as one line and exit code 2, not as a traceback
when the engine opens inside the server, nor as a 401 from the provider at the first request:

- :func:`check_api_keys`: an LM that calls a hosted provider's API (``api.openai.com``,
  ``api.anthropic.com``) without an API key is a :class:`dspy_trio.engine.ConfigError`. An LM of any other
  server may legitimately have none (llama.cpp, vLLM and Ollama need none by default), so a missing key there
  is only a warning, and none at all for a server on this machine.
- :func:`check_engine_opens`: the engine opens once and closes again, without joining a cluster: every
  program module is imported and built, every LM built (no network).
- :func:`describe_lm`: the line ``serve`` logs for each LM: provider, model and API root; never the key
  (nor a password or query in the URL).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import attrs

from dspy_trio.engine import ConfigError, EngineConfig, LMConfig, open_engine

# Hosted APIs that always need a key, by provider (the default API root of ``anthropic`` is its own).
_HOSTED = {"openai": "api.openai.com", "anthropic": "api.anthropic.com"}
_DEFAULT_BASE = {"anthropic": "https://api.anthropic.com"}
_KEY_VARIABLE = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}


def api_root(lm: LMConfig) -> str | None:
    """The LM's API root as it may be shown: without user, password, query or fragment."""
    base = getattr(lm.settings, "api_base", None) or _DEFAULT_BASE.get(lm.provider)
    if base is None:
        return None
    parts = urlsplit(base)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return parts._replace(netloc=netloc, query="", fragment="").geturl()


def _on_this_machine(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_api_keys(config: EngineConfig) -> list[str]:
    """Check that every LM of a hosted API has its key; return warnings for the LMs of other servers
    that have none (servers on this machine excepted).

    Raises:
        ConfigError: naming the LM and the variables that would give it a key.
    """
    warnings = []
    for name, lm in config.lms.items():
        if lm.provider not in _HOSTED or getattr(lm.settings, "api_key", None):
            continue  # simulated needs none; dspy's LiteLLM reads its providers' own variables
        root = api_root(lm) or ""
        host = urlsplit(root).hostname or ""
        where = "LM_API_KEY" if name == "default" else f"api_key or api_key_env in [lms.{name}]"
        if host == _HOSTED[lm.provider]:
            raise ConfigError(
                f"LM {name!r} calls {root} without an API key: set {where} (or {_KEY_VARIABLE[lm.provider]})"
            )
        if not _on_this_machine(host):
            warnings.append(
                f"LM {name!r} sends requests to {root} without an API key: fine for a self-hosted "
                f"server that needs none, else set {where}"
            )
    return warnings


def describe_lm(lm: LMConfig) -> str:
    """What an LM is, for the start-up log: provider, model, API root and whether a key is set."""
    parts = [f"{lm.provider}, model {lm.model!r}"]
    if (root := api_root(lm)) is not None:
        parts.append(f"at {root}")
    if lm.provider in _HOSTED:
        parts.append("API key set" if getattr(lm.settings, "api_key", None) else "no API key")
        parts.append(f"stream_upstream {'on' if getattr(lm.settings, 'stream_upstream', False) else 'off'}")
    return ", ".join(parts)


@contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Hold back a logger's INFO lines (the engine's own start-up lines are logged when it really opens)."""
    target = logging.getLogger(name)
    level = target.level
    target.setLevel(max(logging.WARNING, target.getEffectiveLevel()))
    try:
        yield
    finally:
        target.setLevel(level)


async def check_engine_opens(config: EngineConfig) -> None:
    """Open the engine once and close it again, outside any cluster: programs imported and built,
    LMs built. Blocks on the imports (user modules, DSPy) and on the engine's close.

    Raises:
        ConfigError: what the engine would fail with at start-up.
    """
    local = attrs.evolve(config, cluster=attrs.evolve(config.cluster, redis_url=None))
    with _quiet("engine"):
        async with open_engine(local):
            pass


__all__ = ["api_root", "check_api_keys", "check_engine_opens", "describe_lm"]
