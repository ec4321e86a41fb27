"""Any stock ``dspy.LM`` (every provider DSPy and LiteLLM support), run in worker threads.

This is the compatibility path, with an honest limit: a thread cannot be cancelled. When the caller's
cancel scope fires, the engine stops waiting at once (``abandon_on_cancel=True``) and the request ends
with its typed outcome, but the provider call runs on in its thread until it finishes or hits the LM's
own ``timeout``, still holds its thread slot, and is still billed. Use the Trio-native backends where
cancellation must reach the provider.

The wrapped LM is built with ``num_retries=0`` and an explicit ``timeout`` so that the engine's retry and
deadline policies are the only ones. When streaming, the stock LM's chunks (sent from its thread with
``anyio.from_thread.run``) go through the sink this backend was given, like every backend's: so the
engine's first-token and stall watchdogs and its "no retry after delivery" rule see them.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, ClassVar

import anyio
import anyio.to_thread
import attrs
import dspy
import httpx
from dspy.clients._deprecation import adapter_message_call
from dspy.utils.exceptions import (
    LMError,
    LMRateLimitError,
    LMServerError,
    LMTimeoutError,
    LMTransportError,
    LMUnsupportedFeatureError,
)

from .._errors import (
    ConfigError,
    UpstreamConnectionError,
    UpstreamRateLimitedError,
    UpstreamResponseError,
    UpstreamServerError,
    UpstreamTimeoutError,
)
from .._tables import nested
from .._validate import positive_int
from ._answers import text_or_none
from ._base import Completion, DeltaSink, Message, TrioLM
from ._http_errors import failure, status_words
from ._provider import api_base_field, api_key_field
from ._redact import Redactor
from ._transport import HTTPSettings


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().split("\n", 1)[0]


def _finite(seconds: float | None) -> float | None:
    """DSPy's parsed ``Retry-After``, ignored unless it is a finite number (like our own parser's)."""
    return seconds if seconds is not None and math.isfinite(seconds) else None


@contextmanager
def dspy_lm_errors(model: str, redact: Redactor | None = None) -> Iterator[None]:
    """Translate DSPy's LM errors raised inside the block into the engine's. Their text is the provider's
    (LiteLLM's ``AuthenticationError: Incorrect API key provided: sk-...``): clients read the status
    and what it means, the log gets the text, redacted (see ``_http_errors``)."""
    redact = redact or Redactor()
    try:
        yield
    except LMRateLimitError as exc:
        raise failure(
            UpstreamRateLimitedError,
            model,
            status_words(exc.status or 429),
            _first_line(exc),
            redact,
            status=exc.status or 429,
            retry_after=_finite(exc.retry_after),
        ) from exc
    except LMTimeoutError as exc:
        public = "the upstream did not answer in time"
        raise failure(
            UpstreamTimeoutError, model, public, _first_line(exc), redact, status=exc.status
        ) from exc
    except LMServerError as exc:
        raise failure(
            UpstreamServerError,
            model,
            status_words(exc.status) if exc.status else "the upstream failed",
            _first_line(exc),
            redact,
            status=exc.status,
            retry_after=_finite(exc.retry_after),
        ) from exc
    except LMTransportError as exc:
        public = "the connection to the upstream failed"
        raise failure(UpstreamConnectionError, model, public, _first_line(exc), redact) from exc
    except LMError as exc:
        public = status_words(exc.status) if exc.status else "the upstream's answer could not be used"
        raise failure(
            UpstreamResponseError, model, public, _first_line(exc), redact, status=exc.status
        ) from exc


def refuse_litellm_route(lm: dspy.BaseLM, params: Mapping[str, Any]) -> None:
    """Refuse, before anything runs, a stock LM whose calls DSPy would route through LiteLLM.

    DSPy 3.4 sends a request its native engine cannot represent (``min_tokens``, ``repeat_penalty``,
    ...) through LiteLLM, and streams that route by handing LiteLLM's asyncio coroutine back to the
    calling thread's event loop (``anyio.from_thread.run``): under Trio every such stream failed with
    "unrecognized yield message" and the first one froze the server. The route is decided without I/O
    by DSPy's own planner, asked here about a sample call.

    Raises:
        ConfigError: the route would be LiteLLM.
    """
    from dspy.clients.execution import _select_engine, prepare

    unsupported = _dspy_module("dspy._vendor.lm15.errors").UnsupportedFeatureError

    names = ", ".join(sorted(params)) or "(none)"
    call = prepare(lm, None, [{"role": "user", "content": "probe"}], {}, asynchronous=False, direct=True)
    try:
        backend, _, _ = _select_engine(lm, call, False)
    except (unsupported, LMUnsupportedFeatureError) as exc:
        # A model bound to a declared provider (see compatible_server_model) is refused, not rerouted.
        raise ConfigError(
            f"LM {lm.model!r}: DSPy cannot send these params ({names}): {_first_line(exc)}. Use "
            'provider = "openai" (Trio-native; it sends any params as given), or drop them.'
        ) from exc
    if type(backend).__name__.startswith("LiteLLM"):
        raise ConfigError(
            f"LM {lm.model!r}: with these params ({names}) DSPy takes its LiteLLM route, which runs "
            "asyncio code on the Trio thread and cannot work here. For an OpenAI-compatible server use "
            'provider = "openai" (Trio-native; it sends any params as given), or drop the params DSPy '
            "cannot send natively."
        )


# The provider id of an OpenAI-compatible server that is not OpenAI's, bound to one stock LM only.
COMPATIBLE_PROVIDER = "dspy_trio_compatible"


def compatible_server_model(model: str, api_base: str | None) -> tuple[str, Any] | None:
    """For an ``openai/`` model served elsewhere than api.openai.com: the model string and the DSPy
    provider binding that send ``max_tokens`` (which llama.cpp, vLLM and Ollama read) instead of
    DSPy's ``max_completion_tokens`` (OpenAI's current spelling, which llama.cpp ignores). None for
    other models.

    The binding is a declared provider (OpenAI's chat wire with ``max_tokens_field="max_tokens"``)
    attached to the one ``dspy.LM`` built for it, not registered process-wide
    (``dspy.lm15.register_provider``), so no other LM in the process changes.
    """
    if not model.startswith("openai/") or not api_base:
        return None
    if (httpx.URL(api_base).host or "").lower() == "api.openai.com":
        return None
    lm15 = _dspy_module("dspy.lm15")
    compat = dataclasses.replace(lm15.OpenAIChatCompat.preset("openai"), max_tokens_field="max_tokens")
    access = _dspy_module("dspy._vendor.lm15.features").AccessPolicy(
        provider=COMPATIBLE_PROVIDER, env_keys=(), base_url=api_base
    )
    # A server without keys (llama.cpp) gets a placeholder, as the openai/ route sends none needed.
    definition = lm15.ProviderDefinition.chat(access, compat=compat, placeholder_key="no-key")
    binding = lm15.RegisteredProvider(definition=definition)
    return f"{COMPATIBLE_PROVIDER}/{model.removeprefix('openai/')}", binding


def _dspy_module(name: str) -> Any:
    """Import a DSPy module untyped: a static import of ``dspy.lm15`` (whose vendored package ships
    ``py.typed``) makes mypy type-check all of DSPy, which is not typed."""
    return importlib.import_module(name)


class _ChunksToSink:
    """Stands in for ``dspy.settings.send_stream`` while the stock LM runs: forwards each chunk's text
    to the backend's sink (which reaches the real stream through the engine's guard)."""

    def __init__(self, sink: DeltaSink) -> None:
        self._sink = sink

    async def send(self, chunk: Any) -> None:
        try:
            text = chunk.choices[0].delta.content
        except (AttributeError, IndexError, TypeError):
            return
        if text:
            await self._sink.send(text)


@attrs.frozen
class DSPySettings:
    """The ``dspy`` provider's keys of an ``[lms.NAME]`` table: any stock ``dspy.LM`` model string.

    Attributes:
        api_base: The API root the stock LM calls, when not its provider's own.
        api_key: The stock LM's key; never shown in ``repr``. Without one, LiteLLM reads its providers'
            own variables.
        threads: Worker threads, i.e. concurrent calls.
        http: Only ``read_timeout`` applies: it is the stock LM's per-call ``timeout``.
    """

    provider: ClassVar[str] = "dspy"
    key_env: ClassVar[str | None] = None

    api_base: str | None = api_base_field()
    api_key: str | None = api_key_field()
    threads: int = attrs.field(default=32, validator=positive_int)
    http: HTTPSettings = nested(HTTPSettings)

    def build(self, model: str, params: Mapping[str, Any], *, cache: bool = False) -> ThreadedLM:
        """The stock LM in worker threads (no I/O).

        Raises:
            ConfigError: DSPy would send these parameters through its LiteLLM route (see
                :func:`refuse_litellm_route`).
        """
        extra = {"api_base": self.api_base, "api_key": self.api_key}
        compatible = compatible_server_model(model, self.api_base)
        lm = ThreadedLM.from_model(
            compatible[0] if compatible else model,
            threads=self.threads,
            timeout=self.http.read_timeout,
            cache=cache,
            **{k: v for k, v in extra.items() if v is not None},
            **params,
        )
        if compatible:
            lm.inner._providers = (*lm.inner._providers, compatible[1])
            lm.model = model
        refuse_litellm_route(lm.inner, params)
        return lm


class ThreadedLM(TrioLM):
    """Runs a stock ``dspy.LM`` in anyio worker threads, at most ``threads`` at a time.

    Args:
        lm: The wrapped LM. Build it with ``num_retries=0`` and a ``timeout``; :meth:`from_model` does.
        threads: The most calls in flight at once (each holds one OS thread).
    """

    def __init__(self, lm: dspy.BaseLM, *, threads: int = 32) -> None:
        super().__init__(lm.model)
        self.inner = lm
        self.limiter = anyio.CapacityLimiter(threads)
        self._redact = Redactor([str(lm.kwargs.get("api_key") or "")])

    @classmethod
    def from_model(
        cls,
        model: str,
        *,
        threads: int = 32,
        timeout: float = 120.0,
        cache: bool = False,
        **kwargs: Any,
    ) -> ThreadedLM:
        """Wrap ``dspy.LM(model, ...)`` with no DSPy retries and an explicit per-call timeout."""
        return cls(dspy.LM(model, num_retries=0, timeout=timeout, cache=cache, **kwargs), threads=threads)

    def __repr__(self) -> str:
        return f"ThreadedLM({self.inner!r}, threads={int(self.limiter.total_tokens)})"

    def _call(self, messages: list[Message], params: Mapping[str, Any]) -> Any:
        # Runs in the worker thread. Marking the call as an adapter's own message call keeps DSPy 3.4
        # from warning that dict messages are deprecated: they are exactly what its adapter produced.
        with adapter_message_call(self.inner, messages):
            return self.inner(messages=messages, **params)

    async def complete(
        self, messages: Sequence[Message], params: Mapping[str, Any], sink: DeltaSink | None
    ) -> Completion:
        call: Callable[[], Any] = functools.partial(self._call, list(messages), dict(params))
        # The thread sees this task's context, so the stock LM streams to the sink given here.
        streaming = dspy.context(send_stream=_ChunksToSink(sink)) if sink is not None else nullcontext()
        with dspy_lm_errors(self.model, self._redact), streaming:
            outputs = await anyio.to_thread.run_sync(call, abandon_on_cancel=True, limiter=self.limiter)
        # The answers rule of every path (``_answers``): text of valid Unicode only.
        taken = functools.partial(text_or_none, self.model, redact=self._redact)
        texts = [taken(o.get("text") if isinstance(o, dict) else str(o)) or "" for o in outputs]
        reasoning = [taken(o.get("reasoning_content")) if isinstance(o, dict) else None for o in outputs]
        # The stock LM reported usage to DSPy's tracker itself.
        return Completion(texts, {}, reasoning)
