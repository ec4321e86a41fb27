"""One upstream call shared by every identical call that waits for it (single-flight).

The first call of a key creates the flight and the engine runs it in a task of its own, inside a cancel
scope the flight owns; every identical call that arrives while it runs joins it as a *waiter*. Waiters
stay in their own tasks, under their own cancel scopes, so each keeps its own deadline and its own
cancel; the flight only follows them:

- The flight's deadline is the latest of its waiters' deadlines, moved as they join and leave. Past it
  every waiter's own deadline has passed too.
- When the last waiter leaves (its cancel, its deadline, its client gone), the flight's scope is
  cancelled: the upstream call ends and its connection closes, as for a call that was never shared.
- Every waiter still there when the call ends gets its outcome: the same answer, or its own copy of
  the same error (so one request's traceback never grows into another's). A flight that ended without
  either (everyone left) is reported as :class:`FlightLost` to a waiter that is somehow still there,
  which then starts afresh.

A streamed flight keeps every delta it received, so a waiter that joins late first gets what was
already streamed (in one piece), then the rest as it arrives. Each streaming waiter pushes the deltas
into its own sink from its own task, taking whatever piled up since its last turn in one piece, so a
slow one never holds up the others: its own sink's policy decides what happens to it (``drop`` never
waits; ``timeout`` gives up on it; ``block`` waits, and while a waiter waits in its sink the upstream
read waits too, as it would for a stream of its own). A waiter that merely has not had its turn yet
holds nothing back: 100 waiters of a 20,000 tokens/s stream trail it by a few milliseconds at times.
"""

from __future__ import annotations

import copy
from collections.abc import Awaitable
from typing import Generic, Literal, TypeVar

import trio

from ._request_sharing import Verdict
from .lm._base import DeltaSink

# Seconds the last waiter to leave waits (shielded) for the call it cancelled to end: its connection
# closed, its task gone, as for a call of its own.
CLOSE_WAIT = 5.0

Source = Literal["upstream", "cache", "remote"]

T = TypeVar("T")


class FlightLost(Exception):
    """The flight ended without an outcome (every waiter had left, or the engine closed): a waiter
    still there starts a new one."""


class Waiter:
    """One call waiting for a flight: its deadline, and how far it has read the flight's deltas."""

    __slots__ = ("cursor", "deadline", "streams")

    def __init__(self, deadline: float, streams: bool) -> None:
        self.deadline = deadline
        self.streams = streams
        self.cursor = 0  # deltas handed to the waiter's sink


class Flight(Generic[T]):
    """One shared upstream call (see the module docstring), whose answer is a ``T``: an LM call's
    :class:`Completion`, or a whole prediction (``engine/_shared_predictions.py``).

    Args:
        key: The calls' key (:func:`dspy_trio.engine._call_key.call_key`).
        streamed: Whether the upstream call streams its deltas (some waiter streams).
        deadline: The first waiter's deadline (the scope's, until others join).
    """

    __slots__ = (
        "_all_left",
        "_blocked",
        "_ended",
        "_parked",
        "_room",
        "_waiters",
        "answered",
        "attempts",
        "completion",
        "deltas",
        "done",
        "error",
        "joined",
        "key",
        "scope",
        "source",
        "streamed",
        "verdict",
    )

    def __init__(self, key: str, *, streamed: bool, deadline: float) -> None:
        self.key = key
        self.streamed = streamed
        self.scope = trio.CancelScope(deadline=deadline)
        self.done = False  # the call has ended (answered, failed or cancelled)
        self.attempts = 0  # attempts the upstream call made (retries included)
        self.verdict: Verdict | None = None  # how the adapter's verdict on its answer stores it
        self.completion: T | None = None
        self.error: Exception | None = None
        self.source: Source = "upstream"
        self.deltas: list[str] = []
        self.joined = 0  # waiters that ever joined
        self.answered = 0  # waiters that received the answer
        self._waiters: dict[Waiter, None] = {}  # in the order they joined
        # Waiters' tasks waiting for deltas or the end (parked here directly: a ParkingLot's own
        # bookkeeping is a measurable part of a flight's cost, and one wake-up for all is all it needs).
        self._parked: dict[trio.lowlevel.Task, None] = {}
        # The upstream read, waiting for a trailing waiter (streamed flights only).
        self._room = trio.lowlevel.ParkingLot() if streamed else None
        self._blocked = 0  # waiters waiting in their sink's send (a full buffer under ``block``)
        self._ended: trio.Event | None = None  # made on demand: most flights are never waited for
        self._all_left: trio.Event | None = None

    def __repr__(self) -> str:
        state = "done" if self.done else f"{len(self._waiters)} waiting"
        return f"<Flight {self.key[:12]} [{state}, {len(self.deltas)} deltas, {self.joined} joined]>"

    @property
    def waiting(self) -> int:
        """Waiters there now."""
        return len(self._waiters)

    def join(self, deadline: float, *, streams: bool) -> Waiter:
        """Add a waiter whose deadline is ``deadline``; the flight's moves out to it if later."""
        waiter = Waiter(deadline, streams)
        self._waiters[waiter] = None
        self.joined += 1
        if deadline > self.scope.deadline:
            self.scope.deadline = deadline
        return waiter

    def leave(self, waiter: Waiter) -> bool:
        """Remove ``waiter``. The last one to leave before the end cancels the call (and True is
        returned); one whose deadline was the latest moves the flight's deadline in to the latest of
        those left. Idempotent."""
        if self._waiters.pop(waiter, False) is False:
            return False
        if self._room:
            self._room.unpark_all()
        if self.done:
            if not self._waiters and self._all_left is not None:
                self._all_left.set()
            return False
        if not self._waiters:
            self.scope.cancel()
            return True
        if waiter.deadline >= self.scope.deadline:
            self.scope.deadline = max(w.deadline for w in self._waiters)
        return False

    async def _wait_progress(self) -> None:
        """Block until :meth:`_wake` (a delta, or the end), or the caller's cancel."""
        task = trio.lowlevel.current_task()
        parked = self._parked
        parked[task] = None

        def abort(_: object) -> trio.lowlevel.Abort:
            parked.pop(task, None)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def _wake(self) -> None:
        """Reschedule every waiter parked in :meth:`_wait_progress`, in the order they parked."""
        if self._parked:
            parked, self._parked = self._parked, {}
            for task in parked:
                trio.lowlevel.reschedule(task)

    async def wait_ended(self) -> None:
        """Block until the call has ended."""
        if not self.done:
            if self._ended is None:
                self._ended = trio.Event()
            await self._ended.wait()

    async def wait_all_left(self) -> None:
        """Block until the call has ended and every waiter has its outcome (they leave as they get it)."""
        if not (self.done and not self._waiters):
            if self._all_left is None:
                self._all_left = trio.Event()
            await self._all_left.wait()

    # --- the producer's side ------------------------------------------------------------------------

    async def send(self, text: str) -> None:
        """The upstream call's sink: keep ``text`` and wake the waiters. Blocks while a waiter waits in
        its own sink (its buffer is full under ``block``)."""
        self.deltas.append(text)
        self._wake()
        while self._blocked:
            assert self._room is not None
            await self._room.park()

    async def run(self, call: Awaitable[T]) -> None:
        """Await ``call`` (the upstream call, not yet started) in the flight's scope and hand its outcome
        to the waiters. Blocks until it ends: answered, failed, or cancelled because every waiter left
        (or its deadline passed)."""
        try:
            with self.scope:
                try:
                    self.completion = await call
                except Exception as exc:  # every waiter still there gets its own copy
                    self.error = exc
        finally:
            self.done = True
            self._wake()
            if self._room is not None:
                self._room.unpark_all()
            if self._ended is not None:
                self._ended.set()
            if not self._waiters and self._all_left is not None:
                self._all_left.set()

    # --- a waiter's side ----------------------------------------------------------------------------

    async def receive(self, waiter: Waiter, sink: DeltaSink | None) -> T:
        """Wait for the flight's answer as ``waiter``, pushing its deltas into ``sink`` (the prefix
        first) if given; leave the flight when done, however that is.

        Blocks until the flight ends, or the waiter's own scope is cancelled (it leaves: when it was the
        last, the upstream call is cancelled, and the waiter waits, shielded, at most
        :data:`CLOSE_WAIT` seconds, until the call has ended). ``sink.send`` blocks as the sink's own
        policy decides.

        Raises:
            Exception: a copy of the flight's error.
            FlightLost: the flight ended without an outcome.
        """
        try:
            deltas = self.deltas
            while True:
                if sink is not None and waiter.cursor < len(deltas):
                    start, end = waiter.cursor, len(deltas)
                    waiter.cursor = end
                    self._blocked += 1  # counts only while suspended in send: one that blocks
                    try:
                        await sink.send(deltas[start] if end - start == 1 else "".join(deltas[start:end]))
                    finally:
                        self._blocked -= 1
                        if self._room:
                            self._room.unpark_all()
                    continue
                if self.done:
                    break
                await self._wait_progress()
        finally:
            if self.leave(waiter):
                with trio.move_on_after(CLOSE_WAIT) as cleanup:
                    cleanup.shield = True
                    await self.wait_ended()
        if self.completion is not None:
            self.answered += 1
            return self.completion
        if self.error is not None:
            raise _copy(self.error) from self.error.__cause__
        raise FlightLost(f"the shared call {self.key[:12]} ended without an outcome")


def _copy(error: Exception) -> Exception:
    """A copy of ``error`` for one waiter (the engine's errors copy; anything else is shared)."""
    try:
        duplicate = copy.copy(error)
    except Exception:
        return error
    return duplicate if type(duplicate) is type(error) else error
