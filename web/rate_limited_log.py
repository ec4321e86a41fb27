"""A log for problems that can repeat many times a second: at most one line per interval, with a count.

    problems = RateLimitedLog(logging.getLogger("dspy_trio.web"), interval=10.0)
    nursery.start_soon(problems.run)   # writes the counts that are due; the rest when cancelled
    problems.record("accept", "accept failed: EMFILE (Too many open files)")

The first occurrence of a kind of problem after a quiet interval is logged at once; those that follow
within the interval are counted, and one line says how many there were (``... (37 times in the last
10 s)``) when the interval ends. Every occurrence is in exactly one line's count. A hostile client can
make a problem repeat (a connection that crashes its handler, file descriptors exhausted): the log then
grows by a line per interval, not by a traceback per event.

:class:`RateLimitedTracebacks` brings other code's tracebacks under the same rule: installed on loggers
(Hypercorn's ``hypercorn.error``, which logs a failure of the app's task, and the app's own), it turns
each ERROR record with a traceback, logged in the serving Trio run, into an occurrence of its kind of
failure: the exception's type, as the connection guard's kinds are.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import trio

_OURS = "rate_limited"  # set on the records this log writes: the filter lets them through


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
        ours = {_OURS: True}
        if count == 1:
            self.logger.error("%s", message, exc_info=error, extra=ours)
        else:
            self.logger.error(
                "%s (%d times in the last %g s)", message, count, self.interval, exc_info=error, extra=ours
            )


class RateLimitedTracebacks(logging.Filter):
    """A logging filter that sends ERROR records with a traceback to a :class:`RateLimitedLog` instead.

    Only records logged in the Trio run that built the filter are taken (the log runs on its clock);
    others, and records without a traceback, pass unchanged. The line keeps the record's message and
    names the failure (type and text); its kind is the failure's type (of an exception group, its first
    leaf that is not ``trio.Cancelled``), so a client cannot make new kinds by varying what it sends (a
    path, a header). The traceback goes with the first line of a type in the life of the process; a
    second bug raising the same type shows in its lines' text.

    Args:
        problems: Where the lines go (its ``run`` task must be running).
    """

    def __init__(self, problems: RateLimitedLog) -> None:
        super().__init__()
        self.problems = problems
        self._run = trio.lowlevel.current_trio_token()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info is None or record.exc_info[1] is None or record.levelno < logging.ERROR:
            return True
        if getattr(record, _OURS, False):
            return True
        try:
            if trio.lowlevel.current_trio_token() is not self._run:
                return True
        except RuntimeError:  # a thread outside Trio
            return True
        error = record.exc_info[1]
        failure = _first_failure(error)
        kind = type(failure)
        text = str(failure).replace("\n", " ")[:200]
        message = f"{record.getMessage()}: {kind.__name__}: {text}"
        self.problems.record(f"traceback:{kind.__module__}.{kind.__qualname__}", message, error=error)
        return False

    @contextmanager
    def installed(self, names: Sequence[str]) -> Iterator[None]:
        """Filter the loggers ``names`` for the block."""
        loggers = [logging.getLogger(name) for name in names]
        for logger in loggers:
            logger.addFilter(self)
        try:
            yield
        finally:
            for logger in loggers:
                logger.removeFilter(self)


def _first_failure(error: BaseException) -> BaseException:
    """``error``, or of a group the first leaf that is not ``trio.Cancelled`` (the group if none)."""
    pending = [error]
    while pending:
        current = pending.pop(0)
        if isinstance(current, BaseExceptionGroup):
            pending[:0] = current.exceptions
        elif not isinstance(current, trio.Cancelled):
            return current
    return error


__all__ = ["RateLimitedLog", "RateLimitedTracebacks"]
