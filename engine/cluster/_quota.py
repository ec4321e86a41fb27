"""RPM/TPM buckets shared by every process through Redis, atomic on the server.

One Lua script refills, corrects and takes in a single step, so two processes can never both take the
last token. Taking reserves: the level may go below zero and the script answers how long the caller
must wait for its share (later callers wait longer, first come first served across the cluster). A wait
that would pass the caller's deadline takes nothing and fails at once, as the local bucket does.

"Now" is an argument of the script, read from the caller's clock: wall time in production (processes
on different hosts agree on it within NTP's error), Trio's clock in tests, where a ``MockClock`` drives
the shared bucket exactly. TPM is charged with an estimate and corrected with the real usage; the
correction is queued (``adjust`` never blocks) and sent with the next call of the script or by the
heartbeat.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import trio

from .._errors import RateLimitWaitError
from .._limits import LimitKind
from .._token_bucket import TokenBucket
from ._redis import RedisLink, RedisUnavailableError

# KEYS[1] = bucket; ARGV = rate per second, capacity, now, amount, max wait, correction.
# Returns {wait, level} as strings (Lua numbers would be truncated to integers): the wait in seconds,
# negative when it would pass the deadline (then nothing was taken), and the level left.
ACQUIRE_SCRIPT = """
local rate = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local amount = tonumber(ARGV[4])
local max_wait = tonumber(ARGV[5])
local correction = tonumber(ARGV[6])
local state = redis.call('HMGET', KEYS[1], 'level', 'updated')
local level = tonumber(state[1])
local updated = tonumber(state[2])
if level == nil or updated == nil then
  level = capacity
  updated = now
end
if now > updated then
  level = math.min(capacity, level + (now - updated) * rate)
  updated = now
end
level = math.min(capacity, level - correction)
local wait = 0
if amount > 0 then
  if level < amount then
    wait = (amount - level) / rate
  end
  if wait <= max_wait then
    level = level - amount
  else
    wait = -wait
  end
end
redis.call('HSET', KEYS[1], 'level', tostring(level), 'updated', tostring(updated))
redis.call('PEXPIRE', KEYS[1], math.ceil((capacity / rate + 60) * 1000))
return {tostring(wait), tostring(level)}
"""

_LONGEST_WAIT = 1e9  # "no deadline", as a number Lua can read


class SharedQuota:
    """A token bucket of ``per_minute`` tokens a minute (burst: a minute's worth) held in Redis.

    Satisfies the :class:`engine._limits.Quota` port. While the link is degraded it uses a local
    bucket with this process's share of the rate (``per_minute`` / the last known number of processes),
    starting empty (full if Redis never answered): across all processes the upstream then sees at most
    the quota's rate meanwhile, never an extra burst, however often Redis comes and goes.
    """

    def __init__(self, link: RedisLink, upstream: str, kind: LimitKind, per_minute: float) -> None:
        if not per_minute > 0:
            raise ValueError("a quota needs a positive rate")
        self._link = link
        self.name = f"{upstream} {kind}"
        self.per_minute = per_minute
        self.rate = per_minute / 60.0
        self.capacity = per_minute
        self.key = link.key("quota", upstream, kind)
        self._script = link.client.register_script(ACQUIRE_SCRIPT)
        self._pending = 0.0  # corrections not yet sent to Redis
        self._fallback: TokenBucket | None = None
        self._fallback_episode = -1
        self._reached = False  # whether Redis ever answered for this bucket
        self._waited = 0.0

    def __repr__(self) -> str:
        return f"<SharedQuota {self.key} [{self.per_minute:g}/min]>"

    @property
    def waited(self) -> float:
        local = self._fallback.waited if self._fallback is not None else 0.0
        return self._waited + local

    def _local(self) -> TokenBucket:
        if self._fallback is None or self._fallback_episode != self._link.degraded_episodes:
            processes = max(1, self._link.processes)
            share = TokenBucket(self.per_minute / processes, name=f"{self.name} (local share)")
            if self._reached:
                # Empty at first: what the others took since is unknown, and N processes falling back
                # together with a share each would add a burst on top of what was used. A process that
                # never reached Redis starts with its full share.
                share.adjust(share.capacity)
            self._fallback = share
            self._fallback_episode = self._link.degraded_episodes
        return self._fallback

    async def _run(self, amount: float, max_wait: float) -> float:
        correction, self._pending = self._pending, 0.0
        args = (self.rate, self.capacity, self._link.clock(), amount, max_wait, correction)
        try:
            reply: Any = await self._link.call(lambda: self._script(keys=[self.key], args=args))
        except BaseException:
            self._pending += correction  # not applied: keep it for the next call
            raise
        self._reached = True
        return float(reply[0])

    async def acquire(self, amount: float = 1.0) -> None:
        """Take ``amount`` from the shared bucket, waiting for it within the caller's deadline.

        Blocks for one Redis round-trip (at most ``call_timeout``) and then for the wait, if any.

        Raises:
            RateLimitWaitError: at once, when the capacity could not arrive before the deadline.
            ValueError: ``amount`` exceeds the bucket's capacity (it could never be granted).
        """
        if amount > self.capacity:
            raise ValueError(f"{self.name}: {amount:g} exceeds the bucket's capacity {self.capacity:g}")
        if self._link.degraded:
            await self._local().acquire(amount)
            return
        left = trio.current_effective_deadline() - trio.current_time()
        try:
            wait = await self._run(amount, min(left, _LONGEST_WAIT) if math.isfinite(left) else _LONGEST_WAIT)
        except RedisUnavailableError:
            await self._local().acquire(amount)
            return
        if wait < 0:
            raise RateLimitWaitError(
                f"{self.name} limit: {-wait:.3f}s wait for capacity would pass the deadline",
                retry_after=-wait,
            )
        if wait > 0:
            started = trio.current_time()
            try:
                await trio.sleep(wait)
            except BaseException:
                self._pending -= amount  # reserved but never used: give it back
                raise
            self._waited += trio.current_time() - started

    def adjust(self, delta: float) -> None:
        """Charge ``delta`` more (or refund). Never blocks: sent with the next call or heartbeat."""
        if self._link.degraded and self._fallback is not None:
            self._fallback.adjust(delta)
            return
        self._pending += delta

    async def flush(self) -> None:
        """Send queued corrections (the heartbeat calls this). Blocks for one bounded round-trip."""
        if self._pending and not self._link.degraded:
            with contextlib.suppress(RedisUnavailableError):
                await self._run(0.0, 0.0)

    async def level(self) -> float:
        """The shared level now (tests, diagnostics). Blocks for one round-trip.

        Raises:
            RedisUnavailableError: Redis did not answer.
        """
        reply = await self._link.call(lambda: self._link.client.hget(self.key, "level"))
        return self.capacity if reply is None else float(reply)
