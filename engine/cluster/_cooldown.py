"""The 429/503 cool-down of an upstream, shared by every process through Redis pub/sub.

When one process learns from a ``Retry-After`` that the upstream wants a pause, it keeps the pause
itself at once and broadcasts how long it lasts on one channel; every other process hears it within a
round-trip and pauses too, so one rate limit does not become a storm from the other replicas. The
broadcast is a queued write: setting a cool-down never blocks a request.

A pause heard is bounded like one's own: at most the hearing guard's ``max_retry_after`` (a broadcast of
``Infinity``, from a bug or from anyone who can publish, pauses that long, not forever), and measured as
a duration, so a sender whose clock is off does not shift it (a message that gives only an end,
``until``, is ignored as malformed: no two processes' clocks need agree).
"""

from __future__ import annotations

import json
import math

import trio

from ._redis import RedisLink


class SharedCoolDown:
    """Satisfies the :class:`dspy_trio.engine._limits.CoolDown` port; :meth:`heard` applies a broadcast."""

    def __init__(self, link: RedisLink, upstream: str, *, max_wait: float = math.inf) -> None:
        self._link = link
        self.upstream = upstream
        self.max_wait = max_wait
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
        seconds = until - trio.current_time()
        message = json.dumps({"upstream": self.upstream, "seconds": seconds, "from": self._link.process_id})
        self._link.write_soon(("publish", self._link.key("cooldown"), message))

    def heard(self, seconds: float) -> None:
        """Apply a cool-down another process broadcast: a pause of ``seconds`` from now, at most
        ``max_wait`` (an infinite one too; one that is not a number is ignored)."""
        if seconds > 0:  # False for NaN
            self._until = max(self._until, trio.current_time() + min(seconds, self.max_wait))
