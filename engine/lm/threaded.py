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

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import anyio
import anyio.to_thread
import dspy
from dspy.clients._deprecation import adapter_message_call
from dspy.utils.exceptions import (
    LMError,
    LMRateLimitError,
    LMServerError,
    LMTimeoutError,
    LMTransportError,
)

from .._errors import (
    UpstreamConnectionError,
    UpstreamError,
    UpstreamRateLimitedError,
    UpstreamResponseError,
    UpstreamServerError,
    UpstreamTimeoutError,
)
from ._base import Completion, DeltaSink, Message, TrioLM


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().split("\n", 1)[0]


@contextmanager
def dspy_lm_errors(model: str) -> Iterator[None]:
    """Translate DSPy's LM errors raised inside the block into the engine's."""
    try:
        yield
    except LMRateLimitError as exc:
        raise UpstreamRateLimitedError(
            _first_line(exc), model=model, status=exc.status or 429, retry_after=exc.retry_after
        ) from exc
    except LMTimeoutError as exc:
        raise UpstreamTimeoutError(_first_line(exc), model=model, status=exc.status) from exc
    except LMServerError as exc:
        raise UpstreamServerError(_first_line(exc), model=model, status=exc.status) from exc
    except LMTransportError as exc:
        raise UpstreamConnectionError(_first_line(exc), model=model) from exc
    except LMError as exc:
        error: UpstreamError = UpstreamResponseError(_first_line(exc), model=model, status=exc.status)
        raise error from exc


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
        with dspy_lm_errors(self.model), streaming:
            outputs = await anyio.to_thread.run_sync(call, abandon_on_cancel=True, limiter=self.limiter)
        texts = [o.get("text") or "" if isinstance(o, dict) else str(o) for o in outputs]
        reasoning = [o.get("reasoning_content") if isinstance(o, dict) else None for o in outputs]
        # The stock LM reported usage to DSPy's tracker itself.
        return Completion(texts, {}, reasoning)
