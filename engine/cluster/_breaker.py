"""The circuit breakers of one LM in every process, sharing what they learn through Redis.

- **Openings** are broadcast on one pub/sub channel, with how long they last and a name (the *epoch*):
  every process that hears one opens its own breaker for as long, so one replica's discovery protects
  them all within a round-trip. A length, not an end on a clock, so a sender whose clock is off does not
  shift it (as the cool-down's). The latest end wins everywhere (ties by name), so all processes agree on
  one opening; a length over the LM's longest opening (``Infinity`` included) counts as that long, and
  one that is not a positive number is ignored.
- **The opening is also kept in Redis**, in ``prefix:breaker:LM:open`` (its epoch, expiring on Redis's
  own clock when its open period and then a half-open period of the LM's longest opening have passed;
  the latest end wins). A process reads it when its breaker is made (its start), each time it subscribes
  again after Redis was unreachable, and at every heartbeat (a pub/sub message lost in a reconnect is
  made good within ``heartbeat_interval``): with the key in its open period it opens for what remains of
  it; in its half-open period it joins that opening half-open, so its calls take part in the cluster's
  count of probes instead of going out as ordinary calls. An opening made while Redis was unreachable
  is written and broadcast when Redis answers again. The process whose probes close the breaker deletes
  the key.
- **Probes** of a half-open breaker are counted across the cluster: each takes one of the opening's
  ``half_open_calls`` places with an atomic ``INCR`` of ``prefix:breaker:LM:probes:EPOCH`` (expiring
  after ``open_for``, so places held by a process that died come back). A process that finds them taken
  fails its calls fast until it hears the probes' outcome, or ``open_for`` has passed. A probe that
  succeeds is broadcast, and every process closes its breaker when the opening's probes all succeeded;
  one that fails opens the breaker again, broadcast as a new opening.
- Each process counts its own calls' failures; broadcasts are queued writes that never block a call.

What holds of the probes, while Redis answers: at most ``half_open_calls`` probes of one opening are out
at once across the cluster, a process that starts or comes back meanwhile included; a place comes back
when its probe is cancelled or refused before it was sent (a ``DECR``), or ``open_for`` after the first
claim (a probe that hangs, a process that died, a cancel that came while the claim's reply was on its
way). Processes whose ``open_for`` differs count by the claiming process's own.

Redis unreachable: every broadcast is dropped and a probe's place is granted locally, so each process
keeps its own breaker until Redis answers again (up to ``half_open_calls`` probes per process then).
"""

from __future__ import annotations

import itertools
import json
import logging
from typing import Any

import trio

from .._breaker import BreakerSettings, CircuitBreaker
from ._redis import RedisLink, RedisUnavailableError

logger = logging.getLogger("dspy_trio.engine.cluster")

# INCR the probe counter of an opening; the first place sets its expiry. Returns the place taken.
CLAIM_SCRIPT = """
local taken = redis.call('INCR', KEYS[1])
if taken == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return taken
"""

# Keep an opening (KEYS[1]: the LM's open key) unless the one kept ends later. ARGV: epoch, the
# half-open period in ms, the whole length in ms (open + half-open).
OPEN_SCRIPT = """
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'epoch', ARGV[1], 'half_open_ms', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return 0
"""

# The opening's probes closed it: forget it (KEYS[1], if still that epoch, ARGV[1]) and its probe
# counter (KEYS[2]: a process that missed the close takes a place at once instead of finding them taken).
CLOSE_SCRIPT = """
if redis.call('TYPE', KEYS[1]).ok == 'hash' and redis.call('HGET', KEYS[1], 'epoch') == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
redis.call('DEL', KEYS[2])
return 0
"""

# The kept opening of each LM (KEYS): epoch, half-open ms and milliseconds left (Redis's clock) per key.
READ_SCRIPT = """
local found = {}
for _, key in ipairs(KEYS) do
  if redis.call('TYPE', key).ok == 'hash' then
    found[#found + 1] = redis.call('HGET', key, 'epoch') or ''
    found[#found + 1] = redis.call('HGET', key, 'half_open_ms') or ''
    found[#found + 1] = redis.call('PTTL', key)
  else  -- none, or not ours to read (an error here would count Redis as down)
    found[#found + 1] = ''
    found[#found + 1] = ''
    found[#found + 1] = -2
  end
end
return found
"""

# Longest epoch a message or the kept opening may name (ours are ``host:pid:random:n``).
MAX_EPOCH = 200


class SharedBreakerPeers:
    """Satisfies :class:`dspy_trio.engine._breaker.BreakerPeers` on Redis; :meth:`heard` applies what
    another process broadcast, :meth:`kept` what Redis keeps.

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
        self._keep = link.client.register_script(OPEN_SCRIPT)
        self._forget = link.client.register_script(CLOSE_SCRIPT)
        self.open_key = link.key("breaker", upstream, "open")
        self.read_once = trio.Event()  # set once what Redis keeps was read (or could not be)

    def __repr__(self) -> str:
        return f"<SharedBreakerPeers {self.upstream}>"

    @property
    def channel(self) -> str:
        return self._link.key("breaker")

    def _probes_key(self, epoch: str) -> str:
        return self._link.key("breaker", self.upstream, "probes", epoch)

    def new_epoch(self) -> str:
        return f"{self._link.process_id}:{next(self._epochs)}"

    def _own(self, epoch: str) -> bool:
        return epoch.startswith(f"{self._link.process_id}:")

    def _publish(self, message: dict[str, Any]) -> None:
        message |= {"lm": self.upstream, "from": self._link.process_id}
        self._link.write_soon(("publish", self.channel, json.dumps(message)))

    def opened(self, until: float, epoch: str) -> None:
        seconds = until - trio.current_time()
        if self.breaker is not None:  # kept first, so that whoever hears the broadcast can read it
            half_open_ms = max(1, round(self.breaker.longest_open * 1000))
            args = [epoch, half_open_ms, max(1, round(seconds * 1000)) + half_open_ms]
            self._link.write_soon(("script", self._keep, [self.open_key], args))
        self._publish({"event": "open", "seconds": seconds, "epoch": epoch})

    def probe_succeeded(self, epoch: str) -> None:
        self._publish({"event": "probe_ok", "epoch": epoch})

    def closed(self, epoch: str) -> None:
        self._link.write_soon(("script", self._forget, [self.open_key, self._probes_key(epoch)], [epoch]))

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
        epoch = _epoch(message["epoch"])
        if message["event"] == "open":
            seconds = message["seconds"]
            if not isinstance(seconds, int | float) or isinstance(seconds, bool):
                raise TypeError(f"an opening's length is a number of seconds; got {seconds!r}")
            if seconds > 0:  # False for NaN
                breaker.heard_open(trio.current_time() + min(seconds, breaker.longest_open), epoch)
        elif message["event"] == "probe_ok":
            breaker.heard_probe_succeeded(epoch)
        else:
            raise ValueError(f"unknown breaker event {message['event']!r}")

    def kept(self, epoch: Any, half_open_ms: Any, left_ms: Any) -> None:
        """Apply the opening Redis keeps (``epoch`` "" or None: none), with ``left_ms`` milliseconds
        of it left, the last ``half_open_ms`` of them half-open; then, if this process's breaker is
        open on an opening of its own that Redis does not keep (made while Redis was unreachable),
        keep and broadcast it.

        Raises:
            ValueError, TypeError: what Redis keeps is malformed.
        """
        breaker = self.breaker
        if breaker is None:
            return
        if epoch:
            epoch, left = _epoch(epoch), float(left_ms) / 1000
            # Not a positive length (NaN, -1: no expiry) is no opening of ours; of its own openings
            # this process knows better (the key's end is later by the write's delay).
            if left > 0 and not self._own(epoch):
                open_left = left - float(half_open_ms) / 1000
                if open_left > 0:
                    breaker.heard_open(trio.current_time() + min(open_left, breaker.longest_open), epoch)
                else:
                    breaker.heard_half_open(epoch)
        if breaker.state == "open" and self._own(breaker.epoch) and breaker.epoch != epoch:
            self.opened(breaker.open_until, breaker.epoch)


def _epoch(value: Any) -> str:
    epoch = value if isinstance(value, str) else str(value)
    if not epoch or len(epoch) > MAX_EPOCH:
        raise ValueError(f"an epoch is a name of 1 to {MAX_EPOCH} characters; got {len(epoch)}")
    return epoch


READ_BATCH = 64


class KeptOpenings:
    """Reads the openings Redis keeps for every breaker of this process and applies them (see
    :meth:`SharedBreakerPeers.kept`). A :class:`~._heartbeat.Flushes`: read at every heartbeat."""

    def __init__(self, link: RedisLink) -> None:
        self._link = link
        self._script = link.client.register_script(READ_SCRIPT)
        self.peers: dict[str, SharedBreakerPeers] = {}

    def __repr__(self) -> str:
        return f"<KeptOpenings {sorted(self.peers)}>"

    async def flush(self, idle_after: float) -> None:
        await self.read()

    async def read(self, peers: list[SharedBreakerPeers] | None = None) -> None:
        """Read and apply the kept openings of ``peers`` (default: all). Blocks for one bounded
        round-trip per 64 LMs; does nothing when Redis cannot be asked. A malformed opening is logged
        and ignored."""
        peers = list(self.peers.values()) if peers is None else peers
        for first in range(0, len(peers), READ_BATCH):
            batch = peers[first : first + READ_BATCH]
            keys = [each.open_key for each in batch]
            try:
                found: Any = await self._link.call(lambda keys=keys: self._script(keys=keys))  # type: ignore[misc]
            except RedisUnavailableError:
                found = None
            for index, each in enumerate(batch):
                each.read_once.set()
                if found is None:
                    continue
                epoch, half_open_ms, left_ms = found[3 * index : 3 * index + 3]
                try:
                    each.kept(epoch, half_open_ms, left_ms)
                except (ValueError, TypeError):
                    logger.warning("ignored a malformed circuit-breaker opening in %s", each.open_key)


def shared_breaker(
    link: RedisLink, upstream: str, settings: BreakerSettings, *, longest_open: float
) -> tuple[CircuitBreaker, SharedBreakerPeers]:
    """A breaker for ``upstream`` whose openings and probes are shared through ``link``."""
    peers = SharedBreakerPeers(link, upstream)
    breaker = CircuitBreaker(upstream, settings, longest_open=longest_open, peers=peers)
    peers.breaker = breaker
    return breaker, peers
