"""The base of the engine's LM backends: a ``dspy.BaseLM`` whose ``acall`` is Trio-native.

DSPy adapters call ``await lm.acall(messages=[...], **kwargs)`` and expect a list of completions (strings,
or dicts with ``text`` and optional ``reasoning_content``). Every stock async path in DSPy 3.4 calls
asyncio directly and fails under ``trio.run``; overriding ``acall`` is the one seam that is Trio-native
end to end, and so the one where Trio's cancellation reaches the provider's socket.

Overriding ``acall`` skips what ``BaseLM.acall`` would do around the call: DSPy's cache, retries, history,
callbacks and usage bookkeeping. This class puts back the parts a server needs: usage is reported to
DSPy's usage tracker (``dspy.settings.usage_tracker``) and to the engine's request trace, the optional
DSPy cache is consulted, and streamed text goes to ``dspy.settings.send_stream``: straight to the engine's
own router (a :class:`TextRouter`, no object per delta), or to any other stream (a user's channel read
with ``dspy.streaming.StreamListener``) as chunks in the shape the listener understands.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

import attrs
import dspy
import trio

from .. import _dspy
from .._trace import call_params, record_finish, record_lm_call

Message = Mapping[str, Any]

# DSPy passes these to LMs for its own bookkeeping; they are not provider request parameters.
_DSPY_ONLY_KWARGS = frozenset({"rollout_id", "num_retries", "cache", "num_generations"})


class ChunkSender(Protocol):
    """Where streamed chunks go: a ``trio.MemorySendChannel`` or anything with an async ``send``."""

    async def send(self, value: Any, /) -> None: ...


class DeltaSink(Protocol):
    """Where an LM pushes the text of a streamed completion, delta by delta."""

    async def send(self, text: str, /) -> None: ...


class CallGuard(Protocol):
    """Policies wrapped around each LM call (rate limits, retries, timeouts); see
    ``dspy_trio.engine._upstream``."""

    async def call(
        self,
        attempt: Callable[[DeltaSink | None], Awaitable[Completion]],
        sink: DeltaSink | None,
        *,
        estimate: float,
        streamed: bool = False,
    ) -> Completion: ...


@attrs.frozen
class Completion:
    """What one LM call produced.

    Attributes:
        texts: One completion text per choice.
        usage: Provider usage, e.g. ``{"prompt_tokens": 12, "completion_tokens": 30}``.
        reasoning: Per-choice reasoning text for providers that return it separately.
        model: The model that answered, when it is not the called LM's own (a fallback answered).
        finish_reasons: How each choice ended, in OpenAI's words (``stop``, ``length``, ...; None when
            the provider did not say).
    """

    texts: Sequence[str]
    usage: Mapping[str, Any] = attrs.field(factory=dict)
    reasoning: Sequence[str | None] = ()
    model: str | None = None
    finish_reasons: Sequence[str | None] = ()

    def outputs(self) -> list[str | dict[str, Any]]:
        """The completion in the shape DSPy adapters expect from ``lm.acall``."""
        if not any(self.reasoning):
            return list(self.texts)
        return [
            {"text": text, **({"reasoning_content": reasoning} if reasoning else {})}
            for text, reasoning in zip(self.texts, self.reasoning, strict=False)
        ]


class TextRouter(abc.ABC):
    """A ``dspy.settings.send_stream`` that takes the backends' text directly (the engine's own
    router). A backend streaming to it builds no DSPy chunk per delta; see :func:`current_chunk_sink`."""

    @abc.abstractmethod
    def sink(self, predict_id: int | None) -> DeltaSink | None:
        """Where the text of one LM call of the predictor ``predict_id`` goes (None: nobody reads it,
        so the call need not stream)."""


@attrs.define
class ChunkSink:
    """Sends text deltas of one LM call to a foreign stream (one that is not a :class:`TextRouter`) as
    DSPy chunks, routed like DSPy's own by ``predict_id``.

    Blocks in :meth:`send` while the consumer's bounded channel is full: that is the backpressure that
    pauses the provider's socket read.
    """

    stream: ChunkSender
    model: str
    predict_id: int | None

    async def send(self, text: str) -> None:
        """Send one text delta; blocks while the stream's buffer is full."""
        await self.stream.send(_dspy.stream_chunk(self.model, self.predict_id, text))


def current_chunk_sink(model: str) -> DeltaSink | None:
    """The sink for the current DSPy call, or None when nobody is streaming it: the engine's router
    gives its own (text only), any other ``send_stream`` gets DSPy-shaped chunks (:class:`ChunkSink`)."""
    stream, predict_id = _dspy.current_stream()
    if stream is None:
        return None
    if isinstance(stream, TextRouter):
        return stream.sink(predict_id)
    return ChunkSink(stream, model, predict_id)


def request_params(
    defaults: Mapping[str, Any], overrides: Mapping[str, Any], request: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Merge an LM's default parameters with a call's, and those with the request's (which win),
    dropping unset values and DSPy-only keys."""
    merged = {**defaults, **overrides, **request} if request else {**defaults, **overrides}
    return {k: v for k, v in merged.items() if v is not None and k not in _DSPY_ONLY_KWARGS}


class TrioLM(dspy.BaseLM):  # type: ignore[misc]
    """A ``dspy.BaseLM`` whose ``acall`` runs on Trio. Subclasses implement :meth:`complete`.

    Instances are async-only: the synchronous ``lm(...)`` path raises, because blocking the event loop
    on a network call is never what a server wants.

    Attributes:
        stream_upstream: Whether a call without a sink is sent upstream as a stream too (a backend that
            can do so sets it); such a call is then watched like a stream (first token, stalls).
    """

    stream_upstream: bool = False

    def __init__(self, model: str, *, cache: bool = False, **kwargs: Any) -> None:
        # num_retries=0: the engine's own retry policy is the only one.
        super().__init__(model=model, cache=cache, num_retries=0, **kwargs)

    async def complete(
        self, messages: Sequence[Message], params: Mapping[str, Any], sink: DeltaSink | None
    ) -> Completion:
        """Run one completion. With a ``sink``, push each text delta to it as it arrives.

        Blocks until the provider has answered in full (or the caller's cancel scope fires, which must
        close the provider connection).
        """
        raise NotImplementedError

    async def maintain(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Background upkeep of the backend's resources while it is in use, e.g. closing connections
        the provider closed. Run it with ``await nursery.start(lm.maintain)``; it runs until cancelled,
        or returns at once when the backend needs none (the default)."""
        task_status.started()

    async def aclose(self) -> None:
        """Release network resources. Safe to call twice."""

    async def acall(
        self, prompt: str | None = None, messages: Sequence[Message] | None = None, **kwargs: Any
    ) -> list[str | dict[str, Any]]:
        """DSPy's async LM entry point, Trio-native. Blocks for the whole completion."""
        if messages is None:
            messages = [{"role": "user", "content": prompt or ""}]
        params = request_params(self.kwargs, kwargs, call_params())
        sink = current_chunk_sink(self.model)
        cache_key = {"model": self.model, "messages": list(messages), **params} if self.cache else None
        if cache_key is not None and (cached := _dspy.cache_get(cache_key)) is not None:
            if sink is not None:
                await sink.send("".join(str(o.get("text") if isinstance(o, dict) else o) for o in cached))
            return list(cached)

        started = trio.current_time()
        try:
            completion = await self.complete_call(messages, params, sink, kwargs)
        finally:
            record_lm_call(trio.current_time() - started)

        if completion.usage:
            _dspy.report_usage(completion.model or self.model, completion.usage)
        if completion.finish_reasons:
            record_finish(completion.finish_reasons)
        outputs = completion.outputs()
        if cache_key is not None:
            _dspy.cache_put(cache_key, outputs)
        return outputs

    async def complete_call(
        self,
        messages: Sequence[Message],
        params: Mapping[str, Any],
        sink: DeltaSink | None,
        call_kwargs: Mapping[str, Any],
    ) -> Completion:
        """One call as :meth:`acall` makes it: :meth:`complete`. A wrapper that must see the call's own
        DSPy arguments too (``rollout_id``, ``cache``, which :func:`request_params` drops) overrides it."""
        return await self.complete(messages, params, sink)

    def forward(self, prompt: str | None = None, messages: Any = None, **kwargs: Any) -> Any:
        raise RuntimeError(
            f"{type(self).__name__} is async-only: run programs with `await program.acall(...)` under Trio"
        )

    async def aforward(self, prompt: str | None = None, messages: Any = None, **kwargs: Any) -> Any:
        raise RuntimeError(f"{type(self).__name__} is called through acall(), not aforward()")


class GuardedLM(TrioLM):
    """A backend whose every completion goes through a :class:`CallGuard` (the engine's upstream
    policies: cool-down, rate limits, adaptive concurrency, timeouts, retries).

    ``open_engine`` wraps each backend in one; the backend itself is not changed. DSPy sees the
    wrapper (same model and parameters), so the cache, usage and trace bookkeeping of :meth:`acall`
    happen once, outside the retries.

    Args:
        inner: The backend that does the calls.
        guard: The policies around each call.
    """

    def __init__(self, inner: TrioLM, guard: CallGuard) -> None:
        super().__init__(model=inner.model, cache=inner.cache)
        self.model_type = inner.model_type
        self.kwargs = inner.kwargs  # the same dict: parameters stay the inner backend's
        self.inner = inner
        self.guard = guard

    def __repr__(self) -> str:
        return f"<GuardedLM {self.inner!r}>"

    # What DSPy's adapters ask an LM (JSONAdapter sends ``response_format`` only where it is supported):
    # the inner backend's answers, never BaseLM's defaults.
    @property
    def supports_function_calling(self) -> bool:
        return bool(self.inner.supports_function_calling)

    @property
    def supports_reasoning(self) -> bool:
        return bool(self.inner.supports_reasoning)

    @property
    def supports_response_schema(self) -> bool:
        return bool(self.inner.supports_response_schema)

    @property
    def supported_params(self) -> set[str]:
        return set(self.inner.supported_params)

    async def complete(
        self, messages: Sequence[Message], params: Mapping[str, Any], sink: DeltaSink | None
    ) -> Completion:
        """The inner backend's completion under the guard. Blocks for waits, attempts and retries."""
        inner = self.inner
        return await self.guard.call(
            lambda guarded_sink: inner.complete(messages, params, guarded_sink),
            sink,
            estimate=estimate_tokens(messages, params),
            streamed=inner.stream_upstream,
        )

    async def maintain(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The inner backend's upkeep."""
        await self.inner.maintain(task_status=task_status)

    async def aclose(self) -> None:
        """Close the inner backend."""
        await self.inner.aclose()


def estimated_usage(messages: Sequence[Message], texts: Sequence[str]) -> dict[str, Any]:
    """Usage for a provider that reported none (a stream without a usage chunk): ~4 characters a
    token, marked ``estimated``."""
    prompt = math.ceil(sum(len(str(m.get("content", ""))) for m in messages) / 4)
    completion = math.ceil(sum(len(text) for text in texts) / 4)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "estimated": True,
    }


def estimate_tokens(messages: Sequence[Message], params: Mapping[str, Any]) -> float:
    """A call's token cost before it runs: ~4 characters a token of prompt, plus the completion cap."""
    prompt = sum(len(str(m.get("content", ""))) for m in messages) / 4
    return math.ceil(prompt) + int(params.get("max_tokens") or 512)
