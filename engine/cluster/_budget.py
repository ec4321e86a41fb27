"""A tenant's budget shared by every process through Redis: one tally per window, however many workers
and replicas spend from it.

The tally of a window is one Redis hash, ``prefix:budget:TENANT:INDEX``, with one field per process: that
process's own spend in the window, as a running total. Writing a running total (``HSET``), not an
increment, makes every write safe to repeat: a write whose reply was lost (a timeout, a cancel) is simply
written again with the next one, and a tally Redis lost (a restart, ``FLUSHALL``) is rebuilt by every
live process's next write. A request's check reads the whole hash (``HGETALL``, one round-trip) and
counts this process's own field from memory, which is never behind.

A spend is written by a task of the cluster right away (and by the heartbeat, if that write failed), so
another process sees it within a round-trip. While Redis is unreachable, each process may spend its
share of what was left at the last answer (the rest divided by the processes counted then), so that
together they stay within the budget; its spend reaches the tally once Redis answers again.
"""

from __future__ import annotations

import contextlib
import math

from .._budget import BudgetLimit, Spent, window_of
from ._redis import RedisLink, RedisUnavailableError


class SharedBudget:
    """Satisfies the :class:`dspy_trio.engine._budget.Budget` port.

    Args:
        link: The process's Redis link.
        tenant: The tenant's name.
        limit: Its budget.
    """

    def __init__(self, link: RedisLink, tenant: str, limit: BudgetLimit) -> None:
        self._link = link
        self.tenant = tenant
        self.limit = limit
        self._own: dict[int, float] = {}  # this process's spend per window (running totals)
        self._written: dict[int, float] = {}  # what Redis was last sent of them
        self._others: dict[int, float] = {}  # the other processes' spend at the last answer
        self._own_at_answer: dict[int, float] = {}  # this process's spend at the last answer
        self._writing = False

    def __repr__(self) -> str:
        return f"<SharedBudget {self.tenant} {self.limit.usd:g} USD / {self.limit.window:g}s>"

    def key(self, index: int) -> str:
        return self._link.key("budget", self.tenant, str(index))

    def _window(self) -> tuple[int, float]:
        index, ends_in = window_of(self._link.clock(), self.limit.window)
        for old in [i for i in self._own if i < index - 1]:  # keep the last window for late writes
            for table in (self._own, self._written, self._others, self._own_at_answer):
                table.pop(old, None)
        return index, ends_in

    async def spent(self) -> Spent:
        """The window's spend by every process. Blocks for one bounded round-trip (none while Redis is
        unreachable: then this process's share of what was left decides)."""
        index, ends_in = self._window()
        if not self._link.degraded:
            try:
                tally = await self._link.call(lambda: self._link.client.hgetall(self.key(index)))
            except RedisUnavailableError:
                pass
            else:
                own = self._own.get(index, 0.0)
                if own and self._link.process_id not in tally and self._written.pop(index, 0.0):
                    self.spend(0.0)  # Redis lost the tally: write this process's part again
                others = sum(_usd(v) for k, v in tally.items() if k != self._link.process_id)
                self._others[index], self._own_at_answer[index] = others, own
                return Spent(others + own, ends_in)
        return Spent(self._local_view(index), ends_in)

    def peek(self) -> Spent:
        """What this process knew at the last answer, with its own spend since (while Redis is
        unreachable: as :meth:`spent` decides then)."""
        index, ends_in = self._window()
        if self._link.degraded:
            return Spent(self._local_view(index), ends_in)
        return Spent(self._others.get(index, 0.0) + self._own.get(index, 0.0), ends_in)

    def _local_view(self, index: int) -> float:
        """What this process may assume was spent while it cannot ask: everything, once it spent its
        share of what was left at the last answer."""
        own = self._own.get(index, 0.0)
        others = self._others.get(index, 0.0)
        left = max(0.0, self.limit.usd - others - self._own_at_answer.get(index, 0.0))
        share = left / max(1, self._link.processes)
        if own - self._own_at_answer.get(index, 0.0) >= share:
            return max(self.limit.usd, others + own)
        return others + own

    def spend(self, usd: float) -> None:
        """Add ``usd`` to this window's spend; a task of the cluster writes it at once. Never blocks."""
        index, _ = self._window()
        self._own[index] = self._own.get(index, 0.0) + usd
        nursery = self._link.nursery
        if not self._writing and nursery is not None and not self._link.degraded:
            self._writing = True
            nursery.start_soon(self._write_all)

    async def _write_all(self) -> None:
        try:
            while self._unwritten():
                await self._write()
        except RedisUnavailableError:
            pass  # the heartbeat writes it once Redis answers
        finally:
            self._writing = False

    def _unwritten(self) -> dict[int, float]:
        return {i: usd for i, usd in self._own.items() if self._written.get(i) != usd}

    async def _write(self) -> None:
        """Write this process's running totals that Redis lacks. Blocks for one bounded round-trip."""
        totals = self._unwritten()
        if not totals:
            return
        link = self._link
        ttl = int(2 * self.limit.window * 1000) + 60_000

        async def command() -> None:
            async with link.client.pipeline(transaction=False) as pipe:
                for index, usd in totals.items():
                    pipe.hset(self.key(index), {link.process_id: repr(usd)})
                    pipe.pexpire(self.key(index), ttl)

        await link.call(command)
        for index, usd in totals.items():
            self._written[index] = max(self._written.get(index, 0.0), usd)

    async def flush(self, idle_after: float) -> None:
        """Write what Redis lacks (the heartbeat calls this). Blocks for at most one round-trip."""
        if self._link.degraded or self._writing:
            return
        with contextlib.suppress(RedisUnavailableError):
            await self._write()


def _usd(value: object) -> float:
    try:
        usd = float(str(value))
    except ValueError:
        return 0.0
    return usd if math.isfinite(usd) and usd > 0 else 0.0
