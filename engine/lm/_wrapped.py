"""The base of LMs that wrap another one (a layer of policy around a backend, not a backend itself)."""

from __future__ import annotations

import trio

from ._base import TrioLM


class WrappedLM(TrioLM):
    """A :class:`TrioLM` in front of ``inner``: the same model and parameters (the same ``kwargs``
    dict), the inner LM's answers to DSPy's capability questions, its upkeep and its closing. Subclasses
    override :meth:`complete` (or :meth:`complete_call`) with what the layer does."""

    def __init__(self, inner: TrioLM) -> None:
        super().__init__(model=inner.model, cache=inner.cache)
        self.model_type = inner.model_type
        self.kwargs = inner.kwargs  # the same dict: parameters stay the inner backend's
        self.inner = inner

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.inner!r}>"

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

    async def maintain(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The inner LM's upkeep."""
        await self.inner.maintain(task_status=task_status)

    async def aclose(self) -> None:
        """Close the inner LM."""
        await self.inner.aclose()
