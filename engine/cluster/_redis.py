"""One process's link to the shared Redis: bounded calls, health, and a queue of background writes.

Every call a request makes to Redis runs under two limits: the configured ``call_timeout`` (a short cap)
and the request's own deadline (the caller's cancel scope). A call that fails or hits the cap marks the
link *degraded*: from then on the shared limits are not asked at all (no request pays for a dead Redis
twice) and each process falls back to local limits, the quota divided by the last known number of
processes. The heartbeat keeps probing, and the first answer ends the degraded state. Both transitions
are logged once each.

Writes nobody waits for (a request's registration, a cool-down's broadcast) go through a bounded queue
that :meth:`RedisLink.run_writer` sends in pipelined batches; when the queue is full they are dropped and
counted, never waited for.

A command whose effect must be known even when its caller leaves before the reply (a quota
reservation, given back if the caller is gone) runs in the link's own task group
(:meth:`RedisLink.call_detached`): the caller stops waiting at its deadline or ``call_timeout`` as for
any call, and the reply, when it comes (a stalled Redis runs the command once it resumes), goes to a
callback instead of being lost with the caller.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Generic, TypeVar

import coredis
import trio
from coredis.exceptions import RedisError

from .._cluster_config import ClusterConfig

logger = logging.getLogger("dspy_trio.engine.cluster")

T = TypeVar("T")

# A write: ("set", key, value, ttl_ms), ("del", key), ("decr", key, ttl_ms), ("publish", channel,
# message) or ("script", script, keys, args) (a script registered with the client, run with EVALSHA). A
# counter decremented expires after ttl_ms, also one that had expired (DECR recreates it).
Write = tuple[Any, ...]

_OUTBOX_SIZE = 4096
_BATCH = 256


_time_stand_in: Callable[[], float] | None = None


@contextlib.contextmanager
def stand_in_for_redis_time(clock: Callable[[], float]) -> Iterator[None]:
    """Tests only: for the block, the shared quota's script reads ``clock()`` (seconds) instead of
    Redis's own ``TIME``, in every process of this interpreter at once, so that a ``MockClock`` drives
    the shared log exactly. One clock for all: processes never send the script an instant of their own
    (in production nothing does; a process's own clock only ever measures durations)."""
    global _time_stand_in
    previous, _time_stand_in = _time_stand_in, clock
    try:
        yield
    finally:
        _time_stand_in = previous


def redis_time_argument() -> str:
    """The script argument that stands in for Redis's ``TIME``: '' (use ``TIME``) unless a test set one."""
    return "" if _time_stand_in is None else repr(float(_time_stand_in()))


class RedisUnavailableError(Exception):
    """Redis did not answer in time or failed; the caller uses its local fallback."""


class RedisLateError(RedisUnavailableError):
    """Redis did not answer within ``call_timeout``, but may still run the command (see
    :meth:`RedisLink.call_detached`)."""


LATE_REPLY_LIMIT = 60.0  # seconds a detached command waits for its reply (a quota's window: then moot)


class Late(Generic[T]):
    """What came of a detached command whose caller left first: its ``reply``, or the ``error`` that
    ended it (``RedisUnavailableError``, or any other ``Exception``)."""

    __slots__ = ("error", "reply")

    def __init__(self, reply: T | None, error: Exception | None) -> None:
        self.reply = reply
        self.error = error


class RedisLink:
    """The shared Redis of one process: the client, the key names, health and the write queue.

    Args:
        client: An entered coredis client (its ``async with`` is the caller's).
        config: The cluster settings.
        clock: Wall time (``time.time``): only the calendar windows of tenants' budgets read it (the
            quota runs on Redis's own clock, heartbeats too; cool-downs travel as durations). Tests
            pass ``trio.current_time`` to drive budgets with a ``MockClock``.
    """

    def __init__(self, client: coredis.Redis[str], config: ClusterConfig, clock: Callable[[], float]) -> None:
        self.client = client
        self.config = config
        self.clock = clock
        self.process_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.degraded = False
        self.degraded_episodes = 0
        self.processes = 1  # last known number of live processes (heartbeats)
        self.counts: deque[int] = deque(maxlen=3)  # the processes counted at the last heartbeats
        self.round_trips = 0
        self.rtt = 0.0  # seconds a call takes, a moving average (waits for quota count it)
        self.failures = 0
        self.writes_dropped = 0
        self._outbox_send, self._outbox_receive = trio.open_memory_channel[Write](_OUTBOX_SIZE)
        # Where detached commands run (the cluster's service nursery, set by open_cluster); None: inline.
        self.nursery: trio.Nursery | None = None

    def __repr__(self) -> str:
        state = "degraded" if self.degraded else "up"
        return (
            f"<RedisLink {self.process_id} [{state}, {self.processes} processes, {self.round_trips} calls]>"
        )

    def key(self, *parts: str) -> str:
        """A key or channel name of this deployment: ``prefix:part:part``."""
        return ":".join((self.config.key_prefix, *parts))

    async def call(
        self, command: Callable[[], Awaitable[T]], *, probe: bool = False, degrade: bool = True
    ) -> T:
        """Run one Redis command within ``call_timeout`` and the caller's deadline.

        Blocks for at most ``call_timeout`` seconds. While degraded, fails at once unless ``probe``.
        With ``degrade=False`` (background writes) a failure is counted but leaves the state alone: the
        heartbeat and the requests' own calls decide whether Redis is reachable.

        Raises:
            RedisUnavailableError: Redis failed or was too slow (the link is now degraded).
            trio.Cancelled: the caller's own deadline or cancel came first (the link stays as it was).
        """
        if self.degraded and not probe:
            raise RedisUnavailableError("redis is unreachable (degraded)")
        self.round_trips += 1
        started = trio.current_time()
        with trio.move_on_after(self.config.call_timeout):
            try:
                reply = await command()
            except trio.Cancelled:
                raise
            except (RedisError, OSError) as exc:
                # coredis may report a cancelled command as a lost connection: a cancel came first
                # (our cap, handled below, or the caller's, which propagates and proves nothing).
                await trio.lowlevel.checkpoint_if_cancelled()
                self._failed(f"{type(exc).__name__}: {exc}", degrade)
                raise RedisUnavailableError(str(exc)) from exc
            self.mark_up()
            took = trio.current_time() - started
            self.rtt = took if not self.rtt else 0.8 * self.rtt + 0.2 * took
            return reply
        self._failed(f"no answer within {self.config.call_timeout:g}s", degrade)
        raise RedisUnavailableError("redis did not answer in time")

    async def call_detached(
        self,
        command: Callable[[], Awaitable[T]],
        on_late: Callable[[Late[T]], None],
        on_left: Callable[[], None] = lambda: None,
    ) -> T:
        """Like :meth:`call`, but the command runs in :attr:`nursery`: when the caller leaves first (its
        cancel or deadline, or ``call_timeout``), the command still completes, waiting for its reply up
        to :data:`LATE_REPLY_LIMIT`, and what came of it goes to ``on_late`` (never called when the
        caller got it). ``on_left`` is called when the caller leaves while the command is still running
        (``on_late`` follows). Blocks like :meth:`call`.

        Raises:
            RedisUnavailableError: as :meth:`call`; :class:`RedisLateError` when the caller stopped
                waiting at ``call_timeout`` (what came of the command goes to ``on_late``).
            trio.Cancelled: the caller's own deadline or cancel came first.
        """
        if self.nursery is None:
            return await self.call(command)
        if self.degraded:
            raise RedisUnavailableError("redis is unreachable (degraded)")
        self.round_trips += 1
        started = trio.current_time()
        done = trio.Event()
        outcome: list[Late[T]] = []
        caller_left = False

        async def run() -> None:
            try:
                with trio.fail_after(LATE_REPLY_LIMIT):
                    reply = await command()
            except trio.Cancelled:
                raise  # the cluster is closing: nobody is left to tell
            except trio.TooSlowError:
                outcome.append(Late(None, RedisUnavailableError("redis never answered")))
            except (RedisError, OSError) as exc:
                outcome.append(Late(None, RedisUnavailableError(f"{type(exc).__name__}: {exc}")))
            except Exception as exc:
                outcome.append(Late(None, exc))
            else:
                outcome.append(Late(reply, None))
            done.set()
            if caller_left:
                on_late(outcome[0])

        self.nursery.start_soon(run)
        try:
            with trio.move_on_after(self.config.call_timeout):
                await done.wait()
        except BaseException:
            if outcome:  # it came as the caller was cancelled: the caller never saw it
                on_late(outcome[0])
            else:
                caller_left = True
                on_left()
            raise
        if not outcome:  # Redis holds the command past the cap: the caller goes on without it
            caller_left = True
            on_left()
            self._failed(f"no answer within {self.config.call_timeout:g}s", True)
            raise RedisLateError("redis did not answer in time")
        late = outcome[0]
        if late.error is not None:
            if isinstance(late.error, RedisUnavailableError):
                self._failed(str(late.error), True)
            raise late.error
        self.mark_up()
        took = trio.current_time() - started
        self.rtt = took if not self.rtt else 0.8 * self.rtt + 0.2 * took
        return late.reply  # type: ignore[return-value]

    def _failed(self, why: str, degrade: bool) -> None:
        if degrade:
            self.mark_down(why)
        else:
            self.failures += 1

    def mark_down(self, why: str) -> None:
        self.failures += 1
        if not self.degraded:
            self.degraded = True
            self.degraded_episodes += 1
            logger.warning(
                "redis unreachable (%s): using local limits (quota / %d processes) until it answers",
                why,
                self.processes,
            )

    def mark_up(self) -> None:
        if self.degraded:
            self.degraded = False
            logger.warning("redis answers again: limits are shared again")

    def write_soon(self, write: Write) -> None:
        """Queue a write for the background writer. Never blocks; dropped (and counted) when full or
        while degraded."""
        if self.degraded:
            self.writes_dropped += 1
            return
        try:
            self._outbox_send.send_nowait(write)
        except trio.WouldBlock:
            self.writes_dropped += 1

    async def run_writer(self) -> None:
        """Send queued writes in pipelined batches, until cancelled. Blocks forever."""
        async for first in self._outbox_receive:
            batch = [first]
            while len(batch) < _BATCH:
                try:
                    batch.append(self._outbox_receive.receive_nowait())
                except trio.WouldBlock:
                    break
            try:
                await self.call(lambda batch=batch: self._send(batch), degrade=False)  # type: ignore[misc]
            except RedisUnavailableError:
                self.writes_dropped += len(batch)

    async def _send(self, batch: list[Write]) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            for write in batch:
                match write:
                    case ("set", key, value, ttl_ms):
                        pipe.set(key, value, px=int(ttl_ms))
                    case ("del", key):
                        pipe.delete([key])
                    case ("decr", key, ttl_ms):
                        pipe.decr(key)
                        pipe.pexpire(key, int(ttl_ms))
                    case ("publish", channel, message):
                        pipe.publish(channel, message)
                    case ("script", script, keys, args):
                        script(keys=keys, args=args, client=pipe)
                    case _:  # pragma: no cover - a programming error
                        raise AssertionError(f"unknown write {write!r}")
