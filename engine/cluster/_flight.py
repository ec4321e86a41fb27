"""Single-flight across processes: an identical call in flight in another process is awaited through
Redis instead of being made twice; and the response cache in Redis.

Within a process, identical calls already share one flight (``engine/_flight.py``); only the flight talks
to Redis, so a process makes one claim per key whatever the number of its waiters. A flight first
*claims* its key with one script call (one round-trip): the cached answer if there is one (a Redis-backed
hit is that one ``GET``), else the key's lease (``SET NX PX``): the process that gets it *leads* and makes
the upstream call (one queued script call renews all of a process's leases every third of their TTL),
then stores the answer, gives the lease up and announces it, in one queued script call (the writes
nobody waits for ride in the link's pipelined batches: a miss costs one round trip). The others *follow*:
they wait for the leader's announcement on the deployment's one ``flight`` channel, bounded by their
flight's deadline, and read the answer the leader stored (the cache entry, or with the cache off a
hand-off entry that lives one lease TTL). An announcement that the leader gave up (its call failed, was
cancelled, or its answer did not parse), or no announcement within a heartbeat interval (at most half a
lease TTL), makes them claim again. A lease names its process: a claim that finds the leader's alive
key gone (the heartbeat keeps it, and it expires three intervals after a process's last beat) takes the
lease over at once; if that cannot be known, the lease expires a lease TTL after its last renewal, and
one follower takes over then.

Redis is never waited on beyond the cluster's call cap and the flight's deadline: when it fails or is
down (the link is degraded, logged once, ``dspy_trio_cluster_degraded`` is 1) the flight makes its call
itself, as without a cluster. A stored value that does not decode is a miss: logged once, and deleted.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from .._answer_cache import CorruptAnswerError, decode, encode
from .._flight import Source
from ..lm._base import Completion
from ._redis import RedisLink, RedisUnavailableError

logger = logging.getLogger("dspy_trio.engine.cluster")

# KEYS: the cache entry, the hand-off entry, the lease. ARGV: the claimant's token ('process id|random'),
# the lease's TTL in ms, '1' to read the cache entry, '1' to read the hand-off entry, the prefix of the
# processes' alive keys. Replies {'cache', value}, {'handoff', value}, {'lead'} (the lease is the
# caller's), {'lead', 'takeover'} (taken from a process whose alive key is gone) or {'follow'}.
CLAIM_SCRIPT = """
if ARGV[3] == '1' then
  local v = redis.call('GET', KEYS[1])
  if v then return {'cache', v} end
end
if ARGV[4] == '1' then
  local v = redis.call('GET', KEYS[2])
  if v then return {'handoff', v} end
end
if redis.call('SET', KEYS[3], ARGV[1], 'NX', 'PX', ARGV[2]) then return {'lead'} end
local holder = redis.call('GET', KEYS[3])
local process = holder and string.match(holder, '^(.*)|[^|]*$')
if process and redis.call('EXISTS', ARGV[5] .. process) == 0 then
  redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[2])
  return {'lead', 'takeover'}
end
return {'follow'}
"""

# KEYS: where the answer goes (or ''), the lease. ARGV: the leader's token, the answer ('' : none),
# its TTL in ms, the channel, the announcement. Stores, gives the lease up if it is still the caller's,
# announces.
ANNOUNCE_SCRIPT = """
if ARGV[2] ~= '' then redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) end
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
"""

# KEYS: leases. ARGV: the TTL in ms, then the leader's token of each lease. Extends each lease that is
# still the caller's.
RENEW_SCRIPT = """
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[i + 1] then redis.call('PEXPIRE', key, ARGV[1]) end
end
return 0
"""


class Lease:
    """A process's claim on one key while its flight makes the call."""

    __slots__ = ("key", "token")

    def __init__(self, key: str, token: str) -> None:
        self.key = key
        self.token = token


class _Interest:
    """A follower waiting for announcements about its key."""

    __slots__ = ("heard", "wakeup")

    def __init__(self) -> None:
        self.heard: str | None = None
        self.wakeup = trio.Event()


class RemoteFlights:
    """The Redis side of single-flight and of the ``redis`` response cache (module docstring).

    Args:
        link: The process's Redis link (its heartbeat keeps this process's alive key).
        lease_ttl: Seconds a lease lasts unless renewed.
        cache_ttl: Seconds a cached answer lasts (when the cache is in Redis).
        cache: Whether the response cache is in Redis (read on claims, written on announcements).
        max_entry_bytes: Answers larger than this are neither stored nor handed off.
    """

    def __init__(
        self, link: RedisLink, *, lease_ttl: float, cache_ttl: float, cache: bool, max_entry_bytes: int
    ) -> None:
        self.link = link
        self.lease_ttl = lease_ttl
        self.cache_ttl = cache_ttl
        self.cache = cache
        self.max_entry_bytes = max_entry_bytes
        self.channel = link.key("flight")
        self.alive_prefix = link.key("alive", "")
        # How long a follower waits for an announcement before it claims again.
        self.poll = min(lease_ttl / 2, link.config.heartbeat_interval)
        self._claim = link.client.register_script(CLAIM_SCRIPT)
        self._announce = link.client.register_script(ANNOUNCE_SCRIPT)
        self._renew = link.client.register_script(RENEW_SCRIPT)
        self._interests: dict[str, list[_Interest]] = {}
        self._held: dict[int, Lease] = {}  # the leases of this process's calls in flight
        self.corrupt = 0  # stored values that did not decode
        self.takeovers = 0  # leases taken after another process's expired
        self.fallbacks = 0  # flights that called upstream themselves because Redis failed

    def __repr__(self) -> str:
        return f"<RemoteFlights {self.link!r} [{sum(map(len, self._interests.values()))} following]>"

    def _keys(self, key: str) -> tuple[str, str, str]:
        return self.link.key("answer", key), self.link.key("handoff", key), self.link.key("lease", key)

    # --- the cache without single-flight --------------------------------------------------------------

    async def read(self, key: str) -> Completion | None:
        """The cached answer of ``key``, or None (a miss, a corrupt entry, Redis unavailable). Blocks for
        at most one bounded round-trip."""
        if self.link.degraded:
            return None
        entry = self._keys(key)[0]
        try:
            value = await self.link.call(lambda: self.link.client.get(entry))
        except RedisUnavailableError:
            return None
        return None if value is None else self._decoded(entry, value)

    def store_soon(self, key: str, completion: Completion) -> None:
        """Store an answer in the cache with a queued write (never blocks; dropped if the queue is full
        or Redis is down)."""
        payload = encode(completion)
        if self.cache and len(payload.encode("utf-8", "surrogatepass")) <= self.max_entry_bytes:
            self.link.write_soon(("set", self._keys(key)[0], payload, int(self.cache_ttl * 1000)))

    def _decoded(self, where: str, value: Any) -> Completion | None:
        try:
            return decode(value)
        except CorruptAnswerError as exc:
            self.corrupt += 1
            if self.corrupt == 1:
                logger.warning(
                    "a stored LM answer could not be read (%s): treated as a miss and deleted (further "
                    "ones are counted, not logged)",
                    exc,
                )
            self.link.write_soon(("del", where))
            return None

    # --- single-flight across processes -------------------------------------------------------------

    async def produce(
        self,
        key: str,
        call: Callable[[], Awaitable[Completion]],
        leased: Callable[[Lease], None],
        *,
        read_cache: bool,
    ) -> tuple[Completion, Source]:
        """The answer of ``key``: from the cache, from the process that leads it, or from ``call()`` made
        here (as the leader, or because Redis failed). ``leased(lease)`` is told when this process leads,
        before the call: the caller must :meth:`announce` once the answer's fate is known.

        Blocks for the call or the leader, within the caller's deadline; every Redis call within the
        cluster's call cap.
        """
        interest = _Interest()
        following = self._interests.setdefault(key, [])
        following.append(interest)  # before the claim: no announcement is missed
        try:
            return await self._produce(key, call, leased, interest, read_cache)
        finally:
            following.remove(interest)
            if not following:
                del self._interests[key]

    async def _produce(
        self,
        key: str,
        call: Callable[[], Awaitable[Completion]],
        leased: Callable[[Lease], None],
        interest: _Interest,
        read_cache: bool,
    ) -> tuple[Completion, Source]:
        entry, handoff, lease_key = self._keys(key)
        token = f"{self.link.process_id}|{uuid.uuid4().hex}"
        read_handoff = False
        claims = 0
        silent = False  # the last wait for the leader heard nothing: it may have died
        while True:
            if self.link.degraded:
                self.fallbacks += 1
                return await call(), "upstream"
            args = [
                token,
                str(int(self.lease_ttl * 1000)),
                "1" if read_cache else "0",
                "1" if read_handoff else "0",
                self.alive_prefix,
            ]
            try:
                reply: Any = await self.link.call(
                    lambda args=args: self._claim(keys=[entry, handoff, lease_key], args=args)  # type: ignore[misc]
                )
            except RedisUnavailableError:
                self.fallbacks += 1
                return await call(), "upstream"
            claims += 1
            kind = _text(reply[0])
            if kind in ("cache", "handoff"):
                found = self._decoded(entry if kind == "cache" else handoff, _text(reply[1]))
                if found is not None:
                    return found, "cache" if kind == "cache" and claims == 1 else "remote"
                read_cache = read_handoff = False  # deleted: claim again, reading nothing
                continue
            if kind == "lead":
                if len(reply) > 1 or silent:
                    self.takeovers += 1
                lease = Lease(lease_key, token)
                self._held[id(lease)] = lease
                leased(lease)
                return await call(), "upstream"
            # Another process leads: wait for its announcement, or claim again after a while (an
            # announcement missed, or a leader that died).
            with trio.move_on_after(self.poll):
                await interest.wakeup.wait()
            heard, interest.heard, interest.wakeup = interest.heard, None, trio.Event()
            silent = heard is None
            if heard == "oversize":  # the leader's answer cannot be handed over: make our own
                return await call(), "upstream"
            if heard in ("answer", "handoff"):
                where = entry if heard == "answer" else handoff
                try:
                    value = await self.link.call(lambda where=where: self.link.client.get(where))  # type: ignore[misc]
                except RedisUnavailableError:
                    continue  # degraded now: the next turn calls upstream
                if value is not None and (found := self._decoded(where, value)) is not None:
                    return found, "remote"
            read_cache, read_handoff = self.cache, True

    async def keep_leases(self) -> None:
        """Renew every lease this process holds, every third of a lease TTL, with one queued script
        call for all of them (never waited for: one that is lost lets a lease expire, and another
        process may then make the same call). Runs until cancelled."""
        while True:
            await trio.sleep(self.lease_ttl / 3)
            if self._held:
                leases = list(self._held.values())
                args = [str(int(self.lease_ttl * 1000)), *(lease.token for lease in leases)]
                self.link.write_soon(("script", self._renew, [lease.key for lease in leases], args))

    def announce(self, key: str, lease: Lease, answer: Completion | None, *, store: bool) -> None:
        """Give the lease up and tell the followers: with ``answer``, stored in the cache (``store`` and
        the cache is in Redis) or as a hand-off entry, or, over ``max_entry_bytes``, that they must each
        call (at once: waiting in turn would cost one upstream call each); without, that they must claim
        again. A queued
        write: never blocks (one that is lost leaves the followers to their own claims)."""
        self._held.pop(id(lease), None)
        entry, handoff, lease_key = self._keys(key)
        where, payload, ttl = "released", "", self.lease_ttl
        if answer is not None:
            encoded = encode(answer)
            if len(encoded.encode("utf-8", "surrogatepass")) <= self.max_entry_bytes:
                payload = encoded
                where, ttl = (
                    ("answer", self.cache_ttl) if store and self.cache else ("handoff", self.lease_ttl)
                )
            else:  # an answer, but too large to hand over: each follower calls at once, not in turn
                where = "oversize"
        target = entry if where == "answer" else handoff
        args = [lease.token, payload, str(int(ttl * 1000)), self.channel, f"{key} {where}"]
        self.link.write_soon(("script", self._announce, [target, lease_key], args))

    def forget(self, lease: Lease) -> None:
        """Stop renewing ``lease`` (its flight ended without an announcement: it expires)."""
        self._held.pop(id(lease), None)

    def heard(self, message: str) -> None:
        """An announcement from the ``flight`` channel (``"KEY answer|handoff|released|oversize"``). Never
        blocks."""
        key, _, where = str(message).partition(" ")
        for interest in self._interests.get(key, ()):
            interest.heard = where
            interest.wakeup.set()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
