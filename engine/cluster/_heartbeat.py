"""Heartbeats: how many processes share the quota, and the probe that ends a degraded state.

Each process writes its id with Redis's own time (``TIME``, read by a script: no process sends a clock)
into one sorted set every ``heartbeat_interval`` seconds; members silent for three intervals are
removed; the set's size is the number of live processes (every worker of every replica), the largest
of the last three counts. The same beat keeps
the process's *alive* key, which expires three intervals after its last beat: how other processes
know that a process that holds a lease on a shared call has died (``_flight``). A degraded process
falls back to the quota divided by the last count it saw, and the heartbeat is also what notices that
Redis answers again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Protocol

import trio

from ._redis import RedisLink, RedisUnavailableError


class Flushes(Protocol):
    """Shared state that queues writes (a quota's corrections, a budget's spend)."""

    async def flush(self, idle_after: float) -> None: ...


_MISSED_BEATS = 3


# KEYS = the sorted set of processes, this process's alive key; ARGV = its id, the silence after which a
# member is dropped (seconds), the set's TTL and the alive key's (ms). Scores are Redis's own clock (TIME):
# a process sends only durations, so one whose clock is off neither drops the others nor is dropped.
HEARTBEAT_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - tonumber(ARGV[2])))
local count = redis.call('ZCARD', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('SET', KEYS[2], '1', 'PX', ARGV[4])
return count
"""


async def beat(link: RedisLink) -> None:
    """One heartbeat: register this process and count the live ones. Blocks for one bounded round-trip.

    Raises:
        RedisUnavailableError: Redis did not answer (the link is degraded).
    """
    silence = _MISSED_BEATS * link.config.heartbeat_interval
    silence_ms = int(silence * 1000)
    keys = [link.key("processes"), alive_key(link, link.process_id)]
    args = [link.process_id, repr(silence), str(silence_ms + 1000), str(silence_ms)]

    async def command() -> int:
        # EVAL, not EVALSHA: the first beat of a process must not cost a NOSCRIPT and a SCRIPT LOAD
        # round trip more (a far Redis would then miss the call cap at start); the script is small.
        count = await link.client.eval(HEARTBEAT_SCRIPT, keys=keys, args=args)
        return count if isinstance(count, int) else 1

    # The most counted in the last few beats: a count never drops at once (a process is only removed
    # after missing as many beats anyway), so a count that Redis lost (FLUSHALL, a restart) and that
    # rebuilds itself over one interval does not grow the local shares.
    link.counts.append(max(1, await link.call(command, probe=True)))
    link.processes = max(link.counts)


def alive_key(link: RedisLink, process_id: str) -> str:
    """The key that exists while ``process_id`` beats."""
    return link.key("alive", process_id)


async def leave(link: RedisLink) -> None:
    """Remove this process from the count, and its alive key (on a clean exit). Blocks for one bounded
    round-trip."""

    async def command() -> None:
        async with link.client.pipeline(transaction=False) as pipe:
            pipe.zrem(link.key("processes"), [link.process_id])
            pipe.delete([alive_key(link, link.process_id)])

    with contextlib.suppress(RedisUnavailableError):
        await link.call(command)


async def run_heartbeat(link: RedisLink, quotas: Callable[[], Iterable[Flushes]]) -> None:
    """Beat every ``heartbeat_interval`` seconds until cancelled; then let each quota and budget send
    what it has queued (corrections, grants and spend made while Redis was unreachable) or check in if it
    was idle."""
    while True:
        await trio.sleep(link.config.heartbeat_interval)
        try:
            await beat(link)
        except RedisUnavailableError:
            continue
        for quota in quotas():
            await quota.flush(idle_after=link.config.heartbeat_interval)
