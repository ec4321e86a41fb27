"""A circuit breaker per LM: when an upstream keeps failing, calls to it fail fast (or fall back) instead
of each paying its timeouts and retries, and a few probes find out when it answers again.

::

    closed ──(failure ratio over `window` >= failure_ratio, with >= min_calls; or a Retry-After)──> open
    open ──(after open_for, or the Retry-After, whichever is longer)──> half_open
    half_open ──(half_open_calls probes succeeded)──> closed
    half_open ──(a probe failed)──> open

The breaker is asked before every attempt of a call (:class:`~dspy_trio.engine._upstream.UpstreamGuard`
does it, before any wait for a cool-down, a concurrency slot or quota), and told each attempt's result:

- Open: :meth:`CircuitBreaker.admit` raises :class:`CircuitOpenError` at once (a few hundred
  nanoseconds, nothing touches the network); half-open: the first ``half_open_calls`` attempts are
  probes, every other one fails fast until the probes have answered.
- A failure counts when the upstream is to blame: 429, 5xx, connection failures, timeouts, answers that
  cannot be read. The caller's own errors (400-class statuses, a prompt too long for the context window)
  and cancelled attempts count neither way; a cancelled probe gives its place back.
- A ``Retry-After`` (429, 503, ...) opens the breaker for at least that long.
- Once the breaker has opened, an attempt that failed is not retried (a call never waits on an upstream
  known to be failing): its error goes to the caller, or the call falls back.

Time is Trio's clock; every transition is logged once (``dspy_trio.engine.breaker``), never per call.

With a cluster (``[cluster]`` Redis) the breakers of one LM in every process share their openings and
probes through :class:`BreakerPeers` (``engine/cluster/_breaker.py``): one process's discovery opens the
breaker everywhere within a pub/sub round-trip (and in a process that starts or reaches Redis again
meanwhile, from the opening Redis keeps), and the half-open probes are counted across the cluster. Each
process counts its own calls, and keeps its own breaker while Redis is unreachable.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import deque
from typing import Literal, Protocol

import attrs
import trio

from ._errors import (
    CircuitOpenError,
    UpstreamContextWindowError,
    UpstreamError,
    UpstreamResponseError,
)
from ._validate import flag, number, positive, positive_int

logger = logging.getLogger("dspy_trio.engine.breaker")

BreakerState = Literal["closed", "open", "half_open"]

# The gauge value of each state (``dspy_trio_breaker_state``).
STATE_VALUES: dict[BreakerState, int] = {"closed": 0, "half_open": 1, "open": 2}

# Calls the window remembers at most: the ratio is over the newest ones when more arrive in a window.
_MAX_CALLS = 10_000


@attrs.frozen
class BreakerSettings:
    """When an LM's circuit breaker opens and how it recovers (``[lms.NAME.breaker]``).

    An LM that has ``fallbacks``, or is one, gets a breaker with these defaults; any other LM gets one
    only when this table is given. ``enabled = false`` turns it off.

    Attributes:
        enabled: Whether the LM has a breaker.
        failure_ratio: Open when at least this share of the calls in the window failed (0 < r <= 1).
        min_calls: ... and the window holds at least this many calls.
        window: Seconds of calls the ratio looks at.
        open_for: Seconds the breaker stays open before it lets probes through.
        half_open_calls: Probes let through when half-open; all must succeed to close it.
    """

    enabled: bool = attrs.field(default=True, validator=flag)
    failure_ratio: float = attrs.field(default=0.5, validator=number(above=0, maximum=1))
    min_calls: int = attrs.field(default=10, validator=positive_int)
    window: float = attrs.field(default=10.0, validator=positive)
    open_for: float = attrs.field(default=10.0, validator=positive)
    half_open_calls: int = attrs.field(default=1, validator=positive_int)


@attrs.frozen
class BreakerStatistics:
    """A snapshot of one breaker.

    Attributes:
        state: ``closed``, ``open`` or ``half_open``.
        calls, failures: Calls and failures in the window now (closed state).
        open_remaining: Seconds until an open breaker lets probes through (0 when not open).
        opened: Times it opened (here, or heard from another process).
        rejected: Calls it failed fast.
    """

    state: BreakerState
    calls: int
    failures: int
    open_remaining: float
    opened: int
    rejected: int


class BreakerPeers(Protocol):
    """The other processes' breakers of the same LM (a cluster); every method but ``claim_probe`` is a
    queued broadcast that never blocks."""

    def new_epoch(self) -> str:
        """A name for a new opening, unique across the cluster."""
        ...

    def opened(self, until: float, epoch: str) -> None:
        """Tell the others this breaker opened (or stays open) until ``until`` (Trio's clock)."""
        ...

    def probe_succeeded(self, epoch: str) -> None:
        """Tell the others a probe of the opening ``epoch`` succeeded."""
        ...

    async def claim_probe(self, epoch: str, limit: int, ttl: float) -> bool:
        """Take one of the ``limit`` probes of the opening ``epoch`` across the cluster; False when the
        others took them all. Blocks for one bounded round-trip; True when the cluster cannot be asked."""
        ...

    def release_probe(self, epoch: str) -> None:
        """Give back a probe that was claimed but never answered (cancelled, the caller's error)."""
        ...

    def closed(self, epoch: str) -> None:
        """Tell the others the probes of the opening ``epoch`` closed this breaker."""
        ...


def counts_against(error: UpstreamError) -> bool:
    """Whether ``error`` says the upstream is failing (a breaker failure), rather than that the request
    was the caller's problem: a 400-class status but 429, or a prompt too long for the context window."""
    if isinstance(error, UpstreamContextWindowError):
        return False
    if isinstance(error, UpstreamResponseError) and error.status is not None:
        return not (400 <= error.status < 500) or error.status in (408, 429)
    return True


class Ticket:
    """One attempt the breaker let through: an ordinary call, or a probe of a half-open breaker."""

    __slots__ = ("generation", "probe")

    def __init__(self, generation: int, probe: bool) -> None:
        self.generation = generation
        self.probe = probe


class CircuitBreaker:
    """The breaker of one LM (see the module docstring).

    Args:
        name: The LM's name (messages, log lines, the cluster's keys).
        settings: Its thresholds.
        longest_open: The longest a ``Retry-After``, or an opening heard from another process, may keep
            it open (the LM's ``retry.max_retry_after``; at least ``open_for``).
        peers: The same LM's breakers in the other processes of a cluster; None for this process only.
    """

    def __init__(
        self,
        name: str,
        settings: BreakerSettings,
        *,
        longest_open: float = 60.0,
        peers: BreakerPeers | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        self.longest_open = max(longest_open, settings.open_for)
        self.peers = peers
        self._state: BreakerState = "closed"
        self._generation = 0  # moves at every transition: results of older tickets are stale
        self._ticket = Ticket(0, probe=False)  # the one ticket of every ordinary call of a generation
        # That ticket while closed, else None: the guard's check without a coroutine per call.
        self.ticket_if_closed: Ticket | None = self._ticket
        self._calls: deque[tuple[float, bool]] = deque()  # (when, failed) in the window, oldest first
        self._failures = 0
        self._until = -math.inf  # the end of the open period
        self._epoch = ""  # the current opening's name (the same in every process that heard it)
        self._epochs = itertools.count(1)
        self._probes: dict[Ticket, float] = {}  # probes let through and not answered -> when
        self._probes_ok = 0  # probes of this opening that succeeded (here, or heard of)
        self._claims_refused_until = -math.inf  # the cluster's probes were all taken: none until then
        self.opened = 0
        self.rejected = 0

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self.name} {self.state}>"

    @property
    def state(self) -> BreakerState:
        """The state now (an open breaker whose time is up is half-open)."""
        if self._state == "open" and trio.current_time() >= self._until:
            self._half_open()
        return self._state

    @property
    def _probes_out(self) -> int:
        return len(self._probes)

    def _places_taken(self, now: float) -> int:
        """Probes that answered well, and those out for less than ``open_for``: one that never answers
        (a hung call without a deadline) gives its place to a new probe then."""
        horizon = now - self.settings.open_for
        return self._probes_ok + sum(1 for admitted in self._probes.values() if admitted > horizon)

    @property
    def epoch(self) -> str:
        """The name of the current opening ("" before the first)."""
        return self._epoch

    @property
    def open_until(self) -> float:
        """The end of the current (or last) open period on Trio's clock."""
        return self._until

    def statistics(self) -> BreakerStatistics:
        state = self.state
        now = trio.current_time()
        if state == "closed":
            self._trim(now)
        return BreakerStatistics(
            state=state,
            calls=len(self._calls),
            failures=self._failures,
            open_remaining=max(0.0, self._until - now) if state == "open" else 0.0,
            opened=self.opened,
            rejected=self.rejected,
        )

    # --- the calls ---------------------------------------------------------------------------------

    async def admit(self) -> Ticket:
        """Let one attempt through, or refuse it. Returns at once unless a probe is claimed from the
        cluster (one bounded Redis round-trip, once per probe).

        Raises:
            CircuitOpenError: the breaker is open, or half-open with every probe taken.
        """
        if self._state == "closed":
            return self._ticket
        now = trio.current_time()
        if (
            self.state == "half_open"
            and now >= self._claims_refused_until
            and self._places_taken(now) < self.settings.half_open_calls
        ):
            return await self._probe(now)
        self.rejected += 1
        if self._state == "open":
            wait = self._until - now
            raise CircuitOpenError(
                f"{self.name}: the circuit breaker is open after the upstream failed; the next probe "
                f"goes in {wait:.3g}s",
                model=self.name,
                retry_after=wait,
            )
        raise CircuitOpenError(
            f"{self.name}: the circuit breaker is half-open and its probes are out",
            model=self.name,
            retry_after=min(1.0, self.settings.open_for),
        )

    async def _probe(self, now: float) -> Ticket:
        ticket = Ticket(self._generation, probe=True)
        self._probes[ticket] = now
        if self.peers is None:
            return ticket
        epoch = self._epoch
        try:
            allowed = await self.peers.claim_probe(
                epoch, self.settings.half_open_calls, self.settings.open_for
            )
        except BaseException:
            self._give_back(ticket, release_claim=False)
            raise
        if ticket.generation != self._generation:
            # It opened again, closed or joined another opening during the claim: the place claimed
            # is of an opening that is over; the call is decided anew (it must not go out as a probe
            # of an upstream known to be failing).
            if allowed:
                self.peers.release_probe(epoch)
            return await self.admit()
        if allowed:
            return ticket
        self._give_back(ticket, release_claim=False)
        self._claims_refused_until = trio.current_time() + self.settings.open_for  # wait for their word
        self.rejected += 1
        raise CircuitOpenError(
            f"{self.name}: the circuit breaker is half-open and other processes are probing",
            model=self.name,
            retry_after=min(1.0, self.settings.open_for),
        )

    def succeeded(self, ticket: Ticket) -> None:
        """The attempt of ``ticket`` succeeded."""
        if ticket.generation != self._generation:
            return  # from before the last transition
        if ticket.probe:
            del self._probes[ticket]
            self._probes_ok += 1
            if self.peers is not None:
                self.peers.probe_succeeded(self._epoch)
            if self._probes_ok >= self.settings.half_open_calls:
                epoch = self._epoch
                self._close(f"{self._probes_ok} probe(s) succeeded")
                if self.peers is not None:
                    self.peers.closed(epoch)
            return
        self._record(trio.current_time(), failed=False)

    def failed(self, ticket: Ticket, error: UpstreamError, retry_after: float | None = None) -> None:
        """The attempt of ``ticket`` failed with ``error``; ``retry_after`` is the pause the upstream
        asked for (already capped by the retry policy), if any."""
        if not counts_against(error):
            self.release(ticket)
            return
        now = trio.current_time()
        current = ticket.generation == self._generation
        if ticket.probe and current:
            del self._probes[ticket]
        if retry_after is not None and retry_after > 0:
            asked = f"the upstream asked for Retry-After {retry_after:g}s ({error.code})"
            self._open_until(now + min(retry_after, self.longest_open), asked)
            return
        if not current:
            return
        if ticket.probe:
            self._open_until(now + self.settings.open_for, f"a probe failed ({error.code})")
            return
        self._record(now, failed=True)
        calls = len(self._calls)
        if calls >= self.settings.min_calls and self._failures >= self.settings.failure_ratio * calls:
            self._open_until(
                now + self.settings.open_for,
                f"{self._failures} of {calls} calls failed in {self.settings.window:g}s (last: {error.code})",
            )

    def release(self, ticket: Ticket) -> None:
        """The attempt of ``ticket`` ended without a verdict on the upstream (cancelled, refused before
        it was sent, the caller's own error): a probe's place goes back."""
        self._give_back(ticket, release_claim=True)

    def allows_retry(self, ticket: Ticket) -> bool:
        """Whether a failed attempt of ``ticket`` may be retried: only while the breaker stayed closed
        (a probe is never retried)."""
        return not ticket.probe and ticket.generation == self._generation and self._state == "closed"

    def _give_back(self, ticket: Ticket, *, release_claim: bool) -> None:
        given_back = ticket.probe and self._probes.pop(ticket, None) is not None
        if given_back and release_claim and self.peers is not None:
            self.peers.release_probe(self._epoch)

    def _record(self, now: float, *, failed: bool) -> None:
        calls = self._calls
        calls.append((now, failed))
        if failed:
            self._failures += 1
        if len(calls) > _MAX_CALLS or calls[0][0] <= now - self.settings.window:
            self._trim(now)

    def _trim(self, now: float) -> None:
        calls, horizon = self._calls, now - self.settings.window
        while calls and (calls[0][0] <= horizon or len(calls) > _MAX_CALLS):
            if calls.popleft()[1]:
                self._failures -= 1

    # --- transitions -------------------------------------------------------------------------------

    def _transition(self, state: BreakerState) -> None:
        self._state = state
        self._generation += 1
        self._ticket = Ticket(self._generation, probe=False)
        self.ticket_if_closed = self._ticket if state == "closed" else None
        self._probes.clear()
        self._claims_refused_until = -math.inf

    def _open_until(self, until: float, why: str) -> None:
        """Open (or keep open) until at least ``until``, as this process's own finding: broadcast."""
        if self._state == "open" and until <= self._until:
            return
        epoch = self._epoch if self._state == "open" else self._new_epoch()
        self._open(until, epoch, why)
        if self.peers is not None:
            self.peers.opened(self._until, self._epoch)

    def _new_epoch(self) -> str:
        return self.peers.new_epoch() if self.peers is not None else f"{self.name}:{next(self._epochs)}"

    def _open(self, until: float, epoch: str, why: str) -> None:
        was_open = self._state == "open"
        if not was_open:
            self._transition("open")
            self._calls.clear()
            self._failures = 0
            self._probes_ok = 0
            self.opened += 1
        if epoch != self._epoch:
            self._probes_ok = 0
        self._until = max(until, self._until) if was_open else until
        self._epoch = epoch
        if not was_open:
            logger.warning(
                "LM %s: circuit breaker open for %.3gs: %s",
                self.name,
                self._until - trio.current_time(),
                why,
            )

    def _half_open(self) -> None:
        self._transition("half_open")
        probes = self.settings.half_open_calls
        logger.info("LM %s: circuit breaker half-open: letting %d probe(s) through", self.name, probes)

    def _close(self, why: str) -> None:
        self._transition("closed")
        self._calls.clear()
        self._failures = 0
        self._probes_ok = 0
        logger.warning("LM %s: circuit breaker closed: %s", self.name, why)

    # --- what other processes found ----------------------------------------------------------------

    def heard_open(self, until: float, epoch: str) -> None:
        """Another process's breaker opened (or stays open) until ``until`` (Trio's clock), as the
        opening ``epoch``. An end further away than ``longest_open`` counts as that far."""
        now = trio.current_time()
        until = min(until, now + self.longest_open)
        if not until > now:  # NaN too
            return
        state = self.state
        if state == "open" and (until, epoch) <= (self._until, self._epoch):
            return
        if state == "open":
            if epoch != self._epoch:
                self._probes_ok = 0
            self._until, self._epoch = until, epoch
            return
        self._open(until, epoch, "another process's breaker opened")

    def heard_half_open(self, epoch: str) -> None:
        """The cluster is half-open on the opening ``epoch`` (what Redis keeps, read by a process that
        starts or comes back): a closed breaker joins it, so that its calls are counted with the
        cluster's probes instead of going out as ordinary calls."""
        if self.state != "closed":
            return
        self._transition("half_open")
        self._calls.clear()
        self._failures = 0
        self._probes_ok = 0
        self._epoch = epoch
        self.opened += 1
        logger.warning(
            "LM %s: circuit breaker half-open: joined another process's opening, its probes are counted "
            "across the cluster",
            self.name,
        )

    def heard_probe_succeeded(self, epoch: str) -> None:
        """A probe of the opening ``epoch`` succeeded in another process."""
        if epoch != self._epoch or self.state == "closed":
            return
        self._probes_ok += 1
        if self._probes_ok >= self.settings.half_open_calls:
            self._close(f"{self._probes_ok} probe(s) succeeded (in another process)")
