"""A log for problems that can repeat many times a second: at most one line per interval, with a count.

    problems = RateLimitedLog(logging.getLogger("dspy_trio.web"), interval=10.0)
    nursery.start_soon(problems.run)   # writes the counts that are due; the rest when cancelled
    problems.record("accept", "accept failed: EMFILE (Too many open files)")

The first occurrence of a kind of problem after a quiet interval is logged at once; those that follow
within the interval are counted, and one line says how many there were (``... (37 times in the last
10 s)``) when the interval ends. Every occurrence is in exactly one line's count. A hostile client can
make a problem repeat (a connection that crashes its handler, file descriptors exhausted): the log then
grows by a line per interval, not by a traceback per event.
"""

from __future__ import annotations

import logging
import math

import trio


class RateLimitedLog:
    """Log each kind of problem at most once per ``interval`` seconds, with a count of occurrences.

    Args:
        logger: Where the lines go (level ERROR).
        interval: The least number of seconds between two lines about the same kind of problem.
    """

    def __init__(self, logger: logging.Logger, *, interval: float = 10.0) -> None:
        self.logger = logger
        self.interval = interval
        self._last_line: dict[str, float] = {}  # kind -> when its last line was written
        self._pending: dict[str, tuple[int, str]] = {}  # kind -> (occurrences not written, last message)
        self._traced: set[str] = set()
        self._wake = trio.Event()

    def record(self, kind: str, message: str, *, error: BaseException | None = None) -> None:
        """Count one occurrence of ``kind``; write its line now unless ``kind`` had one within the interval.

        ``error``'s traceback goes with the first line of each kind in the life of the process only
        (enough to diagnose a bug; a flood does not repeat it). Never blocks.
        """
        count, _ = self._pending.pop(kind, (0, message))
        now = trio.current_time()
        if now < self._last_line.get(kind, -math.inf) + self.interval:
            self._pending[kind] = (count + 1, message)
            self._wake.set()
            return
        trace = error if kind not in self._traced else None
        self._traced.add(kind)
        self._write(kind, count + 1, message, now, error=trace)

    async def run(self) -> None:
        """Write the counts as their intervals end, until cancelled; then write what is left at once."""
        try:
            while True:
                while not self._pending:
                    self._wake = trio.Event()
                    await self._wake.wait()
                await trio.sleep_until(min(self._last_line[kind] for kind in self._pending) + self.interval)
                now = trio.current_time()
                for kind, (count, message) in list(self._pending.items()):
                    if now >= self._last_line[kind] + self.interval:
                        del self._pending[kind]
                        self._write(kind, count, message, now)
        finally:
            for kind, (count, message) in self._pending.items():
                self._write(kind, count, message, trio.current_time())
            self._pending.clear()

    def _write(
        self, kind: str, count: int, message: str, now: float, *, error: BaseException | None = None
    ) -> None:
        self._last_line[kind] = now
        if count == 1:
            self.logger.error("%s", message, exc_info=error)
        else:
            self.logger.error("%s (%d times in the last %g s)", message, count, self.interval, exc_info=error)


__all__ = ["RateLimitedLog"]
