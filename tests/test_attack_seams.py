"""Attacks on the seams merge (nested LMConfig, LM_* env vars, Retry-After everywhere, the connection
reaper, LM defaults, the error tree). Every test here failed against main at 42ce7e1 when written; each
one names the defect it pins. See /work/reports/attack1.md."""

from __future__ import annotations

import copy
import json
import math
import pickle
from typing import Any

import httpx
import pytest
import trio

from dspy_trio.engine import (
    ConfigError,
    DSPySettings,
    EngineConfig,
    LMConfig,
    OpenAISettings,
    OverloadedError,
    ProgramSpec,
    RateLimitWaitError,
    SimulatedSettings,
    UnknownProgramError,
    UpstreamRateLimitedError,
    UpstreamServerError,
    open_engine,
)
from dspy_trio.engine._adaptive import AdaptiveSettings
from dspy_trio.engine._retry import RetryPolicy
from dspy_trio.engine._upstream import UpstreamGuard
from dspy_trio.engine.lm import GuardedLM, SimulatedLM
from dspy_trio.engine.lm._http_errors import parse_retry_after
from dspy_trio.engine.testing import http_response
from tests.scripted_upstream import Scripted, anthropic_lm, guarded, openai_lm

MESSAGES = [{"role": "user", "content": "What is Trio?"}]
OPENAI: dict[str, Any] = {"provider": "openai", "model": "m", "api_base": "http://upstream.test/v1"}


# --- 1. Nested LM tables accept values that crash, spin or hang later -------------------------------------


@pytest.mark.parametrize(
    ("table", "values"),
    [
        ("http", {"idle_check_interval": math.nan}),  # the reaper's first trio.sleep(nan) -> ValueError
        ("http", {"idle_check_interval": 0}),  # the reaper loops on trio.sleep(0): a busy loop
        ("http", {"read_timeout": math.nan}),
        ("http", {"read_timeout": 0}),  # every read times out at once
        ("http", {"read_timeout": "fast"}),  # wrong type, not checked at all
        ("http", {"max_connections": 0}),
        ("retry", {"base_delay": math.nan}),  # the first backoff is trio.sleep(nan) -> ValueError
        ("retry", {"budget_ratio": math.nan}),  # int(nan * n) -> ValueError in RetryBudget.try_spend
        ("retry", {"max_attempts": math.inf}),  # "attempts per call" that is not an integer
        ("retry", {"max_attempts": 2.5}),
        ("adaptive", {"initial": 0, "minimum": 0}),  # 1.0 / limit -> ZeroDivisionError
        ("adaptive", {"minimum": 10, "maximum": 2}),
        ("adaptive", {"decrease": 2.0}),  # "decrease" on overload would double the limit
    ],
    ids=lambda v: json.dumps(v) if isinstance(v, dict) else str(v),
)
def test_nested_tables_refuse_values_that_cannot_work(table: str, values: dict[str, Any]) -> None:
    """Each nested table refuses what cannot work, not only negative numbers: NaN, 0, wrong types and
    inconsistent bounds would fail later at run time (or never: a busy loop)."""
    with pytest.raises(ConfigError):
        LMConfig.from_mapping({**OPENAI, table: values}, where="lms.x")


@pytest.mark.parametrize("table", ["http", "timeouts", "rate_limit", "retry", "adaptive"])
def test_a_nested_table_given_as_a_scalar_is_a_config_error(table: str) -> None:
    """``adaptive = true`` or ``http = 5`` in TOML escapes as attrs' NotAnAttrsClassError (a ValueError
    from _check_numbers), not ConfigError."""
    with pytest.raises(ConfigError):
        LMConfig.from_mapping({**OPENAI, table: True}, where="lms.x")


@pytest.mark.parametrize(
    "params",
    [
        [1, 2],
        {"model": "other"},
        {"cache": True},
        {"api_base": "http://evil.test/v1"},
        {"transport": 1},
        {"messages": []},  # openai.py _body: body.update(params) replaces the prompt itself
        {"stream": True},  # a plain call then asks for SSE and fails to parse it
    ],
    ids=["list", "model", "cache", "api_base", "transport", "messages", "stream"],
)
def test_params_that_cannot_be_passed_to_the_backend_are_a_config_error(params: Any) -> None:
    """``params`` is splatted into the backend's constructor (openai.py from_config ``**config.params``):
    a list, or a key that is also a constructor argument, is accepted by the config and then raises
    TypeError inside open_engine's build_lm."""
    with pytest.raises(ConfigError):
        LMConfig.from_mapping({**OPENAI, "params": params}, where="lms.x")


async def test_an_open_engine_with_reserved_params_fails_with_a_config_error() -> None:
    """Reserved params are refused when the LMConfig is built (earlier than open_engine, which is
    where the raw TypeError used to escape); either way the caller sees a ConfigError."""

    async def open_it() -> None:
        config = EngineConfig(
            lms={"default": LMConfig.from_mapping({**OPENAI, "params": {"model": "other"}})}
        )
        async with open_engine(config):
            pass

    with pytest.raises(ConfigError):
        await open_it()


async def test_a_nan_reaper_interval_does_not_crash_an_open_engine(autojump_clock: Any) -> None:
    """HTTPSettings(idle_check_interval=nan) passes the config; open_engine's upkeep task then dies
    with ValueError ("deadline must not be NaN") and takes the engine down."""

    async def open_for_a_second() -> None:
        lm = LMConfig.from_mapping({**OPENAI, "http": {"idle_check_interval": math.nan}})
        async with open_engine(EngineConfig(lms={"default": lm})):
            await trio.sleep(1)

    with pytest.raises(ConfigError):
        await open_for_a_second()


# --- 2. LM_* environment values --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "env",
    [
        {"LM_TIMEOUT": "nan"},
        {"LM_TIMEOUT": "0"},
        {"LM_MAX_TOKENS": "-1"},
        {"LM_MAX_TOKENS": "0"},
        {"LM_PARAMS": '{"temperature": NaN}'},  # json.loads accepts NaN; httpx refuses to send it
        {"LM_PARAMS": '{"max_tokens": -5}'},
        {"LM_PARAMS": '{"model": "x"}'},  # TypeError in build_lm: model given twice
        {"LM_PARAMS": '{"cache": true}'},
    ],
    ids=lambda env: ",".join(f"{k}={v}" for k, v in env.items()),
)
def test_bad_lm_environment_values_are_config_errors(env: dict[str, str]) -> None:
    """The default LM's variables (engine/_env.py default_lm_from_env) are checked like the file's keys:
    LM_TIMEOUT beyond its sign, LM_MAX_TOKENS and LM_PARAMS at all."""
    with pytest.raises(ConfigError):
        EngineConfig.from_env({"LM_API_BASE": "http://upstream.test/v1", "LM_MODEL": "m", **env})


async def test_a_nan_parameter_is_an_engine_error_not_a_raw_value_error(autojump_clock: Any) -> None:
    """When such a value does reach a call, the JSON encoder raises ValueError ("Out of range float
    values are not JSON compliant"), which no edge translated (the transports' post_json)."""
    from dspy_trio.engine import EngineError

    lm = openai_lm(Scripted(), temperature=math.nan)
    with pytest.raises(EngineError):
        await lm.acall(messages=MESSAGES)


def test_lm_api_key_overrides_a_files_api_key_env_that_is_unset(tmp_path: Any) -> None:
    """The file says api_key_env = "MY_KEY" (unset here), the environment gives LM_API_KEY, which
    from_env documents as overriding the default LM. from_toml raises before the override is seen."""
    path = tmp_path / "c.toml"
    path.write_text(
        '[lms.default]\nprovider = "openai"\nmodel = "m"\napi_base = "http://upstream.test/v1"\n'
        'api_key_env = "ATTACK1_SURELY_UNSET_KEY"\n'
    )
    config = EngineConfig.from_env({"DSPY_TRIO_CONFIG": str(path), "LM_API_KEY": "sk-from-env"})
    assert config.lms["default"].settings.api_key == "sk-from-env"


def test_lm_api_base_alone_does_not_turn_a_files_anthropic_lm_into_openai(tmp_path: Any) -> None:
    """Pointing the file's Anthropic LM at a proxy with LM_API_BASE alone: _default_lm_from_env sets
    provider = "openai" whenever LM_API_BASE is set and LM_PROVIDER is not (the documented default is
    for when nothing else chose a provider), then fails with "LM_PROVIDER=openai needs LM_MODEL" -
    about a variable the user never set."""
    path = tmp_path / "c.toml"
    path.write_text('[lms.default]\nprovider = "anthropic"\nmodel = "claude-x"\napi_key = "sk-ant"\n')
    config = EngineConfig.from_env({"DSPY_TRIO_CONFIG": str(path), "LM_API_BASE": "http://proxy.test"})
    assert config.lms["default"].provider == "anthropic"
    assert config.lms["default"].settings.api_base == "http://proxy.test"


def test_switching_provider_by_env_does_not_send_the_old_providers_key_elsewhere(tmp_path: Any) -> None:
    """File: an OpenAI LM with its key and api_base. Env: LM_PROVIDER=anthropic, LM_MODEL=claude.
    The new Anthropic LM inherits api_base https://api.openai.com/v1 and the OpenAI key (unless
    ANTHROPIC_API_KEY happens to be set): the OpenAI secret goes to whatever the inherited base is,
    as x-api-key, unless switching the provider drops the keys of the old one (engine/_env.py)."""
    path = tmp_path / "c.toml"
    path.write_text(
        '[lms.default]\nprovider = "openai"\nmodel = "gpt"\napi_base = "https://api.openai.com/v1"\n'
        'api_key = "sk-openai-secret"\n'
    )
    lm = EngineConfig.from_env(
        {"DSPY_TRIO_CONFIG": str(path), "LM_PROVIDER": "anthropic", "LM_MODEL": "claude"}
    ).lms["default"]
    assert lm.provider == "anthropic"
    assert getattr(lm.settings, "api_key", None) != "sk-openai-secret"
    assert getattr(lm.settings, "api_base", None) != "https://api.openai.com/v1"


@pytest.mark.parametrize("key", ["sk-abc\n", "sk-\u00e9t\u00e9"], ids=["trailing-newline", "non-ascii"])
def test_an_api_key_that_cannot_be_sent_is_a_config_error(key: str) -> None:
    """A key read from a file with its trailing newline is accepted; every call then fails in h11
    (LocalProtocolError "Illegal header value") which transport_errors maps to a *retryable*
    UpstreamConnectionError: 3 attempts per call, retry budget spent, reported as a connection
    failure. A non-ASCII key raises a raw UnicodeEncodeError from build_lm inside open_engine."""
    with pytest.raises(ConfigError):
        EngineConfig.from_env({"LM_API_BASE": "http://upstream.test/v1", "LM_MODEL": "m", "LM_API_KEY": key})


def test_threads_must_be_an_integer() -> None:
    """``threads = 1.5`` passes _positive; anyio.CapacityLimiter then raises a raw TypeError in
    build_lm (ThreadedLM.__init__)."""
    with pytest.raises(ConfigError):
        LMConfig(model="openai/m", settings=DSPySettings(api_base="http://upstream.test/v1", threads=1.5))  # type: ignore[arg-type]


def test_the_dspy_provider_keeps_a_503s_retry_after() -> None:
    """ "Retry-After honoured on every retryable status" - except for the dspy provider:
    threaded.py dspy_lm_errors copies DSPy's retry_after for LMRateLimitError only; an LMServerError
    (503/529) carrying retry_after=3 becomes an UpstreamServerError with retry_after None."""
    from dspy.utils.exceptions import LMServerError

    from dspy_trio.engine.lm.threaded import dspy_lm_errors

    with pytest.raises(UpstreamServerError) as info, dspy_lm_errors("m"):
        raise LMServerError("busy", status=503, retry_after=3.0)
    assert info.value.retry_after == 3.0


@pytest.mark.parametrize("api_base", ["localhost:8000/v1", "ftp://upstream.test/v1", "not a url"])
def test_an_api_base_that_is_not_an_http_url_is_a_config_error(api_base: str) -> None:
    """``api_base = "localhost:8000/v1"`` (the scheme forgotten) is accepted; every call then fails
    with httpx.UnsupportedProtocol, which transport_errors maps to a retryable
    UpstreamConnectionError: 3 attempts per call (probe: retries_by_cause={'connection': 2})."""
    with pytest.raises(ConfigError):
        LMConfig(model="m", settings=OpenAISettings(api_base=api_base))


def test_a_file_with_only_named_lms_and_programs_loads() -> None:
    """[lms.fast] + [programs.qa] lm = "fast" (no LM called "default"): from_mapping merges in the
    implicit default program, whose LM is "default", and fails with "program 'default' uses LM
    'default', which is not configured" - about a program the user never wrote, unless the implicit
    default program is added only when its LM exists (engine/_engine_config.py)."""
    config = EngineConfig.from_mapping(
        {
            "lms": {"fast": {"provider": "simulated"}},
            "programs": {"qa": {"source": "question -> answer", "lm": "fast"}},
        }
    )
    assert config.programs["qa"].lm == "fast"


def test_lm_model_and_key_without_a_provider_do_not_silently_serve_the_simulated_lm() -> None:
    """LM_MODEL=gpt-4o-mini and LM_API_KEY=sk-... with LM_API_BASE forgotten: the default LM becomes
    the *simulated* provider under the real model's name, and serves made-up answers (only an info
    log line says so). Arguable (the provider default is documented), but a key and a model name are
    an unambiguous request for a real LM."""
    with pytest.raises(ConfigError):
        EngineConfig.from_env({"LM_MODEL": "gpt-4o-mini", "LM_API_KEY": "sk-real"})


# --- 3. Retry-After values from a hostile or broken upstream ----------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "inf"}, None),
        ({"Retry-After": "Infinity"}, None),
        ({"Retry-After": "1e400"}, None),
        ({"retry-after-ms": "inf"}, None),
        ({"retry-after-ms": "nan", "Retry-After": "5"}, 5.0),  # garbage ms should fall through, as "abc" does
        ({"retry-after-ms": "abc", "Retry-After": "5"}, 5.0),  # (the control: passes today)
    ],
    ids=["inf", "Infinity", "1e400", "ms-inf", "ms-nan", "ms-garbage"],
)
def test_non_finite_retry_after_values_are_ignored(headers: dict[str, str], expected: float | None) -> None:
    """lm/_http_errors.py parse_retry_after: float() accepts "inf", "Infinity", "nan" and overflows
    "1e400" to inf; max(0.0, x) keeps inf and turns nan into 0.0."""
    assert parse_retry_after(httpx.Headers(headers), now=0.0) == expected


async def test_an_infinite_retry_after_does_not_hang_a_call_without_deadline(autojump_clock: Any) -> None:
    """A 503 with ``Retry-After: inf`` to a call with no deadline: the backoff is max(jitter, inf) = inf,
    the "past the deadline" check is inf > inf = False, and the call sleeps forever (_upstream.py
    call -> trio.sleep(wait))."""
    script = Scripted(http_response(503, headers={"Retry-After": "inf"}, json={}))
    lm = guarded(openai_lm(script))
    answers: list[Any] = []

    async def call() -> None:
        answers.append(await lm.acall(messages=MESSAGES))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call)
        await trio.sleep(3600)
        nursery.cancel_scope.cancel()
    assert answers == [["ok"]], f"still waiting after an hour; requests at {script.times}"


async def test_an_infinite_retry_after_does_not_block_the_upstream_forever(autojump_clock: Any) -> None:
    """The same header sets the shared cool-down to +inf (_upstream.py: ``_cooldown_until = max(...,
    now + inf)``): a day later every call with a deadline is still refused with RateLimitWaitError,
    and nothing is ever sent to the upstream again."""
    script = Scripted(http_response(503, headers={"Retry-After": "inf"}, json={}))
    lm = guarded(openai_lm(script), attempts=1)
    with trio.move_on_after(10), pytest.raises(UpstreamServerError):
        await lm.acall(messages=MESSAGES)
    await trio.sleep(86400)
    with trio.fail_after(10):
        assert await lm.acall(messages=MESSAGES) == ["ok"]


# --- 4. Error classes ---------------------------------------------------------------------------------------


async def test_an_overloaded_529_pushes_the_adaptive_limit_down(autojump_clock: Any) -> None:
    """Anthropic's 529 is "overloaded_error" and a 503 says the same, but UpstreamServerError has
    pushback = False (engine/_errors.py), so the adaptive limit never hears of it; only 429 and
    timeouts lower it."""
    script = Scripted(http_response(529, json={"error": {"message": "Overloaded"}}))
    lm = guarded(openai_lm(script), attempts=1, adaptive=AdaptiveSettings(initial=16))
    with pytest.raises(UpstreamServerError):
        await lm.acall(messages=MESSAGES)
    assert isinstance(lm, GuardedLM)
    assert isinstance(lm.guard, UpstreamGuard)
    assert lm.guard.statistics().concurrency_limit == 8


@pytest.mark.parametrize(
    "error",
    [
        OverloadedError("queue full", retry_after=1.5),
        RateLimitWaitError("rpm", retry_after=2.0),
        UnknownProgramError("nope", ["default"]),
    ],
    ids=["OverloadedError", "RateLimitWaitError", "UnknownProgramError"],
)
def test_engine_errors_survive_pickle_and_copy(error: Exception) -> None:
    """Exception.__reduce__ rebuilds with ``cls(*self.args)`` = ``cls(message)``; these __init__s need
    more (keyword-only retry_after, positional known), so pickle.loads and copy.copy raise TypeError.
    Errors cross thread/process boundaries (trio.to_thread, test runners, multiprocessing)."""
    for clone in (pickle.loads(pickle.dumps(error)), copy.copy(error)):
        assert type(clone) is type(error)
        assert vars(clone) == vars(error)


def test_frozen_config_values_are_hashable() -> None:
    """@attrs.frozen values promise a hash, but ``params`` (and the lms/programs mappings) are dicts:
    hash(LMConfig()) raises TypeError."""
    assert hash(LMConfig()) == hash(LMConfig())
    assert hash(EngineConfig()) == hash(EngineConfig())


# --- 5. LM defaults ----------------------------------------------------------------------------------------


async def test_response_format_none_in_params_sends_no_response_format(autojump_clock: Any) -> None:
    """README: "a response_format in the LM's params wins". A user whose server rejects
    response_format sets it to None; request_params (lm/_base.py) drops None values, so the
    JSONAdapter's json_object is sent anyway (openai.py _body only honours a non-None choice)."""
    import dspy

    answer = {"choices": [{"index": 0, "message": {"content": '{"answer": "ok"}'}, "finish_reason": "stop"}]}
    script = Scripted(success=answer)
    with dspy.context(lm=openai_lm(script, response_format=None), adapter=dspy.JSONAdapter()):
        await dspy.Predict("question -> answer").acall(question="q")
    assert "response_format" not in script.bodies[0]


async def test_an_anthropic_stream_without_usage_reports_estimated_usage(autojump_clock: Any) -> None:
    """ "Streams without a usage chunk report estimated usage" holds for the OpenAI backend only: the
    Anthropic backend (anthropic.py _stream -> _usage({})) reports 0 tokens, not an estimate."""
    events = [
        {"type": "message_start", "message": {}},
        {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "a fairly long answer"}},
        {"type": "message_stop"},
    ]
    body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)

    class Sink:
        async def send(self, text: str) -> None:
            pass

    lm = anthropic_lm(
        lambda request: [http_response(200, body, headers={"content-type": "text/event-stream"})]
    )
    completion = await lm.complete(MESSAGES, {}, Sink())
    assert completion.texts == ["a fairly long answer"]
    assert completion.usage.get("estimated") is True
    assert completion.usage["completion_tokens"] > 0


class RecordingGuard:
    """A CallGuard that records the token estimate of each call and runs it once."""

    def __init__(self) -> None:
        self.estimates: list[float] = []

    async def call(self, attempt: Any, sink: Any, *, estimate: float, streamed: bool = False) -> Any:
        self.estimates.append(estimate)
        return await attempt(sink)


async def test_the_tpm_estimate_counts_the_output_cap_actually_sent(autojump_clock: Any) -> None:
    """The Anthropic backend always sends max_tokens = 1024, but it is not in the LM's kwargs, so
    estimate_tokens (lm/_base.py) charges the TPM bucket prompt + 512: half the cap that was sent
    (the OpenAI backend, which setdefaults max_tokens, is charged 1024)."""
    script = Scripted(success={"content": [{"type": "text", "text": "ok"}], "usage": {}})
    lm = anthropic_lm(script)
    guard = RecordingGuard()
    await GuardedLM(lm, guard).acall(messages=[{"role": "user", "content": "hi"}])
    assert script.bodies[0]["max_tokens"] == 1024
    assert guard.estimates[0] >= 1024


# --- 6. open_engine's lifetime -----------------------------------------------------------------------------


class RecordingLM(SimulatedLM):
    """A simulated LM that records whether it was closed."""

    closed = False

    async def aclose(self) -> None:
        self.closed = True
        await super().aclose()


async def test_cancelling_an_open_engine_still_closes_its_lms(autojump_clock: Any) -> None:
    """engine/_engine.py open_engine's finally runs ``await engine.drain()`` unshielded: with the
    caller's scope cancelled, drain's first checkpoint raises Cancelled and ``_close_lms()`` never runs,
    so every LM's connections stay open (the same happens when an upkeep task crashes)."""
    lm = RecordingLM()
    with trio.move_on_after(1):
        async with open_engine(EngineConfig(), lms={"default": lm}):
            await trio.sleep_forever()
    assert lm.closed


async def test_a_crashed_upkeep_task_still_closes_the_lms(autojump_clock: Any) -> None:
    class Crashing(RecordingLM):
        async def maintain(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            task_status.started()
            await trio.sleep(1)
            raise RuntimeError("reaper failed")

    lm = Crashing()
    with pytest.raises(RuntimeError):
        async with open_engine(EngineConfig(), lms={"default": lm}):
            await trio.sleep_forever()
    assert lm.closed


async def test_an_engine_that_fails_to_open_closes_the_lms_it_was_given() -> None:
    """open_engine documents that the engine closes the ``lms=`` it is given, but a ConfigError from
    ProgramRegistry.build (or from build_lm of a later LM) happens before the try/finally: the LMs
    already built or given are never closed."""
    lm = RecordingLM()
    config = EngineConfig(programs={"bad": ProgramSpec("no_such_module_attack1:thing")})
    with pytest.raises(ConfigError):
        async with open_engine(config, lms={"default": lm}):
            pass
    assert lm.closed


# --- 7. Cool-down with concurrent callers ------------------------------------------------------------------


async def test_a_longer_retry_after_arriving_during_a_cool_down_is_honoured(autojump_clock: Any) -> None:
    """Calls A and B are sent at t=0. A's 429 says Retry-After 5; caller C arrives at t=0.5 and waits
    for the cool-down. At t=1, B's 429 says Retry-After 30. C still sends at t=5: _upstream.py
    _wait_cooldown sleeps until the deadline it read once and does not look again (a storm at t=5
    against an upstream that asked for 30 s)."""
    script = Scripted(
        http_response(429, headers={"Retry-After": "5"}, json={}),
        [1.0, http_response(429, headers={"Retry-After": "30"}, json={})],  # B's answer comes at t=1
    )
    sent = script.times
    lm = guarded(openai_lm(script), attempts=1)

    async def call_failing() -> None:
        with pytest.raises(Exception, match="429"):
            await lm.acall(messages=MESSAGES)

    async def late_call() -> None:
        await trio.sleep(0.5)
        assert await lm.acall(messages=MESSAGES) == ["ok"]

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call_failing)
        nursery.start_soon(call_failing)
        nursery.start_soon(late_call)
    assert sent[:2] == [0.0, 0.0]
    assert sent[2] >= 31.0, f"C was sent at t={sent[2]}"


@pytest.mark.parametrize(
    "error",
    [
        RateLimitWaitError("cool-down", retry_after=math.inf),
        UpstreamRateLimitedError("429", model="m", retry_after=math.inf),
    ],
    ids=["RateLimitWaitError", "UpstreamRateLimitedError"],
)
def test_an_upstreams_infinite_retry_after_does_not_crash_the_web_error_response(error: Any) -> None:
    """The upstream's ``Retry-After: inf`` reaches the errors the web layer formats (the 429's own
    retry_after, or the RateLimitWaitError of the poisoned cool-down): web/errors.py
    engine_error_response does ``math.ceil(retry_after)`` -> OverflowError instead of a 429."""
    from dspy_trio.web.errors import engine_error_response

    status, _, headers = engine_error_response(error)
    assert status == 429
    assert headers["Retry-After"].isdigit()


async def test_an_infinite_retry_after_over_real_hypercorn_is_a_429_and_an_error_event() -> None:
    """The same over a real Hypercorn socket: the LM's 429 carries retry_after = inf (as parsed from
    ``Retry-After: inf``). /predict should answer 429 with a numeric Retry-After, and a stream should
    end with an ``error`` event. web/errors.py:74 raises OverflowError in both: /predict answers 500,
    and the stream never ends (no final or error event; the client waits until its own timeout)."""
    from tests.helpers import FailingLM
    from tests.web_helpers import running, settings

    lm_config = LMConfig(
        retry=RetryPolicy(max_attempts=1), settings=SimulatedSettings(first_token_delay=0.0, token_delay=0.0)
    )
    service = settings(engine=EngineConfig(lms={"default": lm_config}))
    failing = FailingLM(UpstreamRateLimitedError("429", model="m", retry_after=math.inf))
    stream_text: list[str] = []
    async with (
        running(service, lms={"default": failing}) as server,
        httpx.AsyncClient(base_url=server.url) as client,
    ):
        response = await client.post("/predict", json={"question": "q"})
        with trio.move_on_after(3):
            # The 429 started a cool-down (capped by retry.max_retry_after): a stream whose deadline
            # ends before it is refused at once with an error event instead of waiting.
            body = {"inputs": {"question": "q"}, "timeout_secs": 2}
            async with client.stream("POST", "/v1/programs/default/stream", json=body) as stream:
                async for text in stream.aiter_text():
                    stream_text.append(text)
    streamed = "".join(stream_text)
    outcome = (response.status_code, "event: error" in streamed)
    assert outcome == (429, True), f"/predict: {response.text}; stream body: {streamed!r}"
    assert response.headers["Retry-After"].isdigit()


async def test_an_error_in_the_block_of_open_server_escapes_as_itself() -> None:
    """web/server.py open_server: an exception raised inside ``async with open_server(...)`` cancels
    the nursery running Hypercorn instead of shutting it down; Hypercorn's lifespan task then trips
    trio's "Nursery misnesting detected!" / "Nursery stack corrupted", the generator reports
    "didn't stop after athrow()", and an ExceptionGroup (not the ValueError) reaches the caller."""
    from tests.web_helpers import running

    class Boom(Exception):
        pass

    async def serve_then_fail() -> None:
        async with running() as server, httpx.AsyncClient(base_url=server.url) as client:
            assert (await client.get("/health")).status_code == 200
            raise Boom

    with pytest.raises(Boom):
        await serve_then_fail()
