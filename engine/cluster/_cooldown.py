"""The 429/503 cool-down of an upstream, shared by every process through Redis pub/sub.

When one process learns from a ``Retry-After`` that the upstream wants a pause, it keeps the pause
itself at once and broadcasts its end (on the shared clock) on one channel; every other process hears it
within a round-trip and pauses too, so one rate limit does not become a storm from the other replicas.
The broadcast is a queued write: setting a cool-down never blocks a request.
"""

from __future__ import annotations

import json
import math

import trio

from ._redis import RedisLink


class SharedCoolDown:
    """Satisfies the :class:`dspy_trio.engine._limits.CoolDown` port; :meth:`heard` applies a broadcast."""

    def __init__(self, link: RedisLink, upstream: str) -> None:
        self._link = link
        self.upstream = upstream
        self._until = -math.inf

    def __repr__(self) -> str:
        return f"<SharedCoolDown {self.upstream} until {self._until:.3f}>"

    @property
    def until(self) -> float:
        return self._until

    def extend_to(self, until: float) -> None:
        if until <= self._until:
            return
        self._until = until
        shared_until = self._link.clock() + (until - trio.current_time())
        message = json.dumps(
            {"upstream": self.upstream, "until": shared_until, "from": self._link.process_id}
        )
        self._link.write_soon(("publish", self._link.key("cooldown"), message))

    def heard(self, shared_until: float) -> None:
        """Apply a cool-down another process broadcast (its end on the shared clock)."""
        self._until = max(self._until, trio.current_time() + (shared_until - self._link.clock()))
