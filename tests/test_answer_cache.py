"""The stored form of LM answers, the memory cache's bounds, the call key, and the ``[cache]`` config."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from dspy_trio.engine import ConfigError, EngineConfig
from dspy_trio.engine._answer_cache import CorruptAnswerError, MemoryAnswerCache, decode, encode, size_of
from dspy_trio.engine._cache_config import CacheConfig
from dspy_trio.engine._call_key import call_key, digest_secret
from dspy_trio.engine.lm import Completion

SECRET = digest_secret("a secret of the deployment")
MESSAGES = [{"role": "system", "content": "answer briefly"}, {"role": "user", "content": "What is Trio?"}]


# --- the stored form -------------------------------------------------------------------------------


@given(
    texts=st.lists(st.text(), min_size=1, max_size=3),
    tokens=st.integers(0, 10**6),
    reasoning=st.lists(st.none() | st.text(), max_size=3),
    finish_reasons=st.lists(st.none() | st.sampled_from(["stop", "length"]), min_size=1, max_size=3)
    | st.just(()),
)
def test_an_answer_reads_back_as_it_was_stored(
    texts: list[str], tokens: int, reasoning: list[str | None], finish_reasons: list[str | None]
) -> None:
    """How its choices ended too: a cached answer that was cut at ``max_tokens`` still reads as cut."""
    usage = {"prompt_tokens": tokens, "completion_tokens": 1}
    completion = Completion(texts, usage, reasoning, finish_reasons=finish_reasons)
    assert decode(encode(completion)) == completion


@pytest.mark.parametrize(
    "stored",
    [
        "",
        "not json",
        b"\xff\xfe\x00garbage",
        "null",
        "[]",
        '{"v": 2, "t": ["a"], "u": {}}',  # another version
        '{"v": 1, "t": [], "u": {}}',  # no text
        '{"v": 1, "t": [1], "u": {}}',
        '{"v": 1, "t": ["a"], "u": []}',
        '{"v": 1, "t": ["a"], "u": {}, "r": [3]}',
        '{"v": 1, "t": ["a"], "u": {}, "f": [3]}',
        '{"v": 1, "t": ["a"], "u": {}, "f": "length"}',
        '{"v": 1, "t": "a", "u": {}}',
        '{"v": 1, "t": ["a"], "u": {}',  # cut short
    ],
)
def test_anything_else_under_the_key_is_corrupt(stored: Any) -> None:
    with pytest.raises(CorruptAnswerError):
        decode(stored)


# --- the memory cache ------------------------------------------------------------------------------


def answer(text: str) -> Completion:
    return Completion([text], {"total_tokens": 1})


async def test_the_least_recently_used_answer_goes_first(autojump_clock: Any) -> None:
    cache = MemoryAnswerCache(ttl=60, max_entries=2, max_bytes=10**6)
    for key in ("a", "b"):
        cache.put(key, answer(key), size_of(answer(key)))
    assert cache.get("a") is not None  # "a" used: "b" is now the least recent
    cache.put("c", answer("c"), size_of(answer("c")))
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (answer("a"), None, answer("c"))
    assert cache.evictions == 1


async def test_the_memory_cache_keeps_within_its_bytes(autojump_clock: Any) -> None:
    one = size_of(answer("x" * 100))
    cache = MemoryAnswerCache(ttl=60, max_entries=100, max_bytes=3 * one)
    for i in range(10):
        cache.put(str(i), answer(str(i) * 100), one)
        assert cache.bytes <= 3 * one
    assert len(cache) == 3
    assert cache.get("9") is not None
    assert cache.get("0") is None
    cache.put("huge", answer("y"), 4 * one)  # larger than the whole cache: not stored
    assert cache.get("huge") is None
    assert len(cache) == 3


async def test_an_answer_is_served_until_its_ttl_and_not_after(autojump_clock: Any) -> None:
    cache = MemoryAnswerCache(ttl=10, max_entries=10, max_bytes=10**6)
    cache.put("k", answer("a"), 10)
    await trio.sleep(9.999)
    assert cache.get("k") is not None
    await trio.sleep(0.001)
    assert cache.get("k") is None
    assert len(cache) == 0
    assert cache.bytes == 0


async def test_storing_a_key_again_replaces_it_and_its_size(autojump_clock: Any) -> None:
    cache = MemoryAnswerCache(ttl=10, max_entries=10, max_bytes=10**6)
    cache.put("k", answer("a"), 100)
    cache.put("k", answer("b"), 7)
    assert cache.get("k") == answer("b")
    assert cache.bytes == 7


# --- the key --------------------------------------------------------------------------------------


def key(**changes: Any) -> str:
    values: dict[str, Any] = {
        "lm": "default",
        "model": "gpt-x",
        "messages": MESSAGES,
        "params": {"temperature": 0.0, "max_tokens": 100},
        "scope": "",
    }
    values.update(changes)
    rollout = values.pop("rollout_id", None)
    return call_key(
        SECRET,
        values["lm"],
        values["model"],
        values["messages"],
        values["params"],
        scope=values["scope"],
        rollout_id=rollout,
    )


def test_the_key_ignores_credentials_transport_and_parameter_order() -> None:
    base = key()
    assert key(params={"max_tokens": 100, "temperature": 0.0}) == base
    assert key(params={"temperature": 0.0, "max_tokens": 100, "api_key": "sk-1", "timeout": 3}) == base
    assert key(params={"temperature": 0.0, "max_tokens": 100, "stream": True, "api_base": "http://x"}) == base


@pytest.mark.parametrize(
    "change",
    [
        {"lm": "other"},
        {"model": "gpt-y"},
        {"messages": [*MESSAGES, {"role": "user", "content": "and?"}]},
        {"params": {"temperature": 0.5, "max_tokens": 100}},
        {"params": {"temperature": 0.0}},
        {"scope": "alice-key"},
        {"rollout_id": 1},
    ],
)
def test_anything_the_answer_depends_on_changes_the_key(change: dict[str, Any]) -> None:
    assert key(**change) != key()


def test_the_key_shows_neither_the_prompt_nor_the_api_key() -> None:
    shown = key(scope="sk-very-secret-key")
    assert len(shown) == 40
    assert all(c in "0123456789abcdef" for c in shown)
    other_secret = call_key(digest_secret("another deployment"), "default", "gpt-x", MESSAGES, {}, scope="")
    assert other_secret != call_key(SECRET, "default", "gpt-x", MESSAGES, {}, scope="")


def test_a_message_with_a_lone_surrogate_or_odd_values_still_has_a_key() -> None:
    odd = [
        {"role": "user", "content": "\ud800"},
        {"role": "user", "content": [{"type": "image", "x": object()}]},
    ]
    assert key(messages=odd) != key()


# --- configuration -----------------------------------------------------------------------------------


def test_the_cache_section_of_a_config_file(tmp_path: Any) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[cache]\nbackend = "memory"\nttl = 60\nscope = "global"\nmax_entries = 5\nsingle_flight = false\n'
    )
    config = EngineConfig.from_toml(path)
    assert config.cache == CacheConfig(
        backend="memory", ttl=60, scope="global", max_entries=5, single_flight=False
    )
    assert EngineConfig().cache == CacheConfig()  # single-flight on, the cache off
    assert (
        EngineConfig.from_env({"DSPY_TRIO_CONFIG": str(path), "DSPY_TRIO_CACHE": "off"}).cache.backend
        == "off"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('backend = "disk"', "cache.backend must be one of off, memory, redis"),
        ('scope = "user"', "cache.scope must be one of key, global"),
        ("ttl = 0", "cache.ttl must be positive"),
        ("ttl = nan", "cache.ttl must be a finite number"),
        ("max_entries = 1.5", "cache.max_entries must be an integer"),
        ("max_entry_bytes = 2048\nmax_bytes = 1024", "max_entry_bytes must be at most max_bytes"),
        ('single_flight = "yes"', "cache.single_flight must be true or false"),
        ("across_processes = 1", "cache.across_processes must be true or false"),
        ("lease_ttl = 0", "cache.lease_ttl must be at least 0.05"),
        ("size = 3", "cache: unknown key(s) size"),
        ('backend = "redis"', 'cache.backend = "redis" uses the [cluster] Redis'),
    ],
)
def test_a_bad_cache_setting_is_a_config_error_naming_it(tmp_path: Any, text: str, message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f"[cache]\n{text}\n")
    with pytest.raises(
        ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")
    ):
        EngineConfig.from_toml(path)


@pytest.mark.parametrize(
    ("cache", "across"),
    [
        (CacheConfig(), True),  # the default: with a cluster, single-flight through Redis too
        (CacheConfig(backend="memory"), True),
        (CacheConfig(backend="redis"), True),  # the cache lookup is the claim's round trip
        (CacheConfig(across_processes=False), False),
        (CacheConfig(backend="redis", across_processes=False), False),
        (CacheConfig(across_processes=True), True),
        (CacheConfig(single_flight=False, backend="redis", across_processes=True), False),
    ],
)
def test_when_single_flight_reaches_other_processes(cache: CacheConfig, across: bool) -> None:
    assert cache.flights_across_processes is across


def test_a_bad_cache_backend_from_the_environment_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="DSPY_TRIO_CACHE='disk'"):
        EngineConfig.from_env({"DSPY_TRIO_CACHE": "disk"})
