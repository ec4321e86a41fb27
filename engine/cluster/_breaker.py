"""The circuit breakers of one LM in every process, sharing what they learn through Redis.

- **Openings** are broadcast on one pub/sub channel, with how long they last and a name (the *epoch*):
  every process that hears one opens its own breaker for as long, so one replica's discovery protects
  them all within a round-trip. A length, not an end on a clock, so a sender whose clock is off does not
  shift it (as the cool-down's). The latest end wins everywhere (ties by name), so all processes agree on
  one opening; a length over the LM's longest opening (``Infinity`` included) counts as that long, and
  one that is not a positive number is ignored.
- **Probes** of a half-open breaker are counted across the cluster: each takes one of the opening's
  ``half_open_calls`` places with an atomic ``INCR`` of ``prefix:breaker:LM:probes:EPOCH`` (expiring
  after ``open_for``, so places held by a process that died come back). A process that finds them taken
  fails its calls fast until it hears the probes' outcome, or ``open_for`` has passed. A probe that
  succeeds is broadcast, and every process closes its breaker when the opening's probes all succeeded;
  one that fails opens the breaker again, broadcast as a new opening.
- Each process counts its own calls' failures; broadcasts are queued writes that never block a call.

Redis unreachable: every broadcast is dropped and a probe's place is granted locally, so each process
keeps its own breaker until Redis answers again.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import trio

from .._breaker import BreakerSettings, CircuitBreaker
from ._redis import RedisLink, RedisUnavailableError

# INCR the probe counter of an opening; the first place sets its expiry. Returns the place taken.
CLAIM_SCRIPT = """
local taken = redis.call('INCR', KEYS[1])
if taken == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return taken
"""


class SharedBreakerPeers:
    """Satisfies :class:`dspy_trio.engine._breaker.BreakerPeers` on Redis; :meth:`heard` applies what
    another process broadcast.

    Args:
        link: The process's Redis link.
        upstream: The LM's name.
    """

    def __init__(self, link: RedisLink, upstream: str) -> None:
        self._link = link
        self.upstream = upstream
        self.breaker: CircuitBreaker | None = None
        self._epochs = itertools.count(1)
        self._script = link.client.register_script(CLAIM_SCRIPT)

    def __repr__(self) -> str:
        return f"<SharedBreakerPeers {self.upstream}>"

    @property
    def channel(self) -> str:
        return self._link.key("breaker")

    def _probes_key(self, epoch: str) -> str:
        return self._link.key("breaker", self.upstream, "probes", epoch)

    def new_epoch(self) -> str:
        return f"{self._link.process_id}:{next(self._epochs)}"

    def _publish(self, message: dict[str, Any]) -> None:
        message |= {"lm": self.upstream, "from": self._link.process_id}
        self._link.write_soon(("publish", self.channel, json.dumps(message)))

    def opened(self, until: float, epoch: str) -> None:
        self._publish({"event": "open", "seconds": until - trio.current_time(), "epoch": epoch})

    def probe_succeeded(self, epoch: str) -> None:
        self._publish({"event": "probe_ok", "epoch": epoch})

    async def claim_probe(self, epoch: str, limit: int, ttl: float) -> bool:
        """Take a place among the opening's ``limit`` probes. Blocks for one Redis round-trip (at most
        ``call_timeout``, within the caller's deadline); True when Redis cannot be asked."""
        key, ttl_ms = self._probes_key(epoch), max(1, round(ttl * 1000))
        try:
            # A cancel while the reply is on its way may leave the place taken: it expires with the key.
            taken: Any = await self._link.call(lambda: self._script(keys=[key], args=[ttl_ms]))
        except RedisUnavailableError:
            return True  # each process keeps its own breaker while Redis is unreachable
        return int(taken) <= limit

    def release_probe(self, epoch: str) -> None:
        ttl_ms = max(1, round(self.breaker.settings.open_for * 1000)) if self.breaker is not None else 1
        self._link.write_soon(("decr", self._probes_key(epoch), ttl_ms))

    def heard(self, message: dict[str, Any]) -> None:
        """Apply a broadcast of another process (an opening, a probe that succeeded).

        Raises:
            ValueError, TypeError, KeyError: the message is malformed.
        """
        breaker = self.breaker
        if breaker is None:
            return
        epoch = str(message["epoch"])
        if message["event"] == "open":
            seconds = float(message["seconds"])
            if seconds > 0:  # False for NaN
                breaker.heard_open(trio.current_time() + min(seconds, breaker.longest_open), epoch)
        elif message["event"] == "probe_ok":
            breaker.heard_probe_succeeded(epoch)
        else:
            raise ValueError(f"unknown breaker event {message['event']!r}")


def shared_breaker(
    link: RedisLink, upstream: str, settings: BreakerSettings, *, longest_open: float
) -> tuple[CircuitBreaker, SharedBreakerPeers]:
    """A breaker for ``upstream`` whose openings and probes are shared through ``link``."""
    peers = SharedBreakerPeers(link, upstream)
    breaker = CircuitBreaker(upstream, settings, longest_open=longest_open, peers=peers)
    peers.breaker = breaker
    return breaker, peers
