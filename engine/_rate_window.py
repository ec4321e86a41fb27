"""Requests and tokens per minute as providers enforce them: at most ``rpm`` requests and ``tpm`` tokens
in any 60-second window.

A token bucket refilling at ``rpm / 60`` a second with a minute's burst lets an upstream see twice its
quota within one minute (the burst, then a minute of refill), which a provider enforcing "60 a minute"
answers with 429s; no bucket can keep the promise without slowing a client that sends at exactly the
quota's pace. So the limit is a log of the grants of the last minute: a grant is made at the first
instant at which it, and everything granted in the 60 seconds before it, fit the limits.

Grants are reservations: a caller that must wait reserves the first instant that fits (after every
reservation made before it, so waiters are served first come, first served, and a large TPM charge is
not starved by small ones) and sleeps until then; leaving early gives the reservation back. A grant's
charge may be corrected after the call (TPM is charged with an estimate and corrected with the real
usage), and given back entirely when the call was never sent.

The same log, in Lua, is what ``dspy_trio.engine.cluster`` keeps in Redis (``engine/cluster/_quota.py``).
Grants that land within :func:`merge_gap` of the log's last entry (just under ``60 / rpm``, at least
``MERGE_GAP``) are merged into it, at the later time (never earlier: merging only ever delays a later
grant), which bounds the log to about ``rpm`` (at most about 2,048) entries; a client pacing itself at
the quota sends exactly ``60 / rpm`` apart, so it is never merged, never delayed (up to 2,048 a minute).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator

import trio

from ._errors import RateLimitWaitError

WINDOW = 60.0  # seconds: the window every limit is counted over
MERGE_GAP = WINDOW / 2048  # the least gap below which a grant is merged into the log's last entry


def merge_gap(rpm: float) -> float:
    """How close to the log's last entry a grant is merged into it: just under a request limit's pace
    (a client within the limit sends no closer, whatever the rounding of its times), at least
    :data:`MERGE_GAP`."""
    return max(MERGE_GAP, 0.999 * WINDOW / rpm) if rpm > 0 else MERGE_GAP


class Entry:
    """Grants at one instant: ``requests`` and ``tokens`` counted in every window containing ``at``."""

    __slots__ = ("alive", "at", "mergeable", "requests", "tag", "tokens")

    def __init__(
        self, at: float, requests: float, tokens: float, tag: str, *, mergeable: bool = True
    ) -> None:
        self.at = at
        self.requests = requests
        self.tokens = tokens
        self.tag = tag  # who knows of it (engine.cluster: the shared log it was recorded in)
        self.alive = True  # still in the log (not expired)
        self.mergeable = mergeable  # later grants may be merged into it (not into an inserted entry)

    def __repr__(self) -> str:
        return f"<Entry at {self.at:.3f}: {self.requests:g} requests, {self.tokens:g} tokens>"


class WindowLog:
    """The entries of the last :data:`WINDOW` seconds, in time order, and their totals."""

    def __init__(self, gap: float = MERGE_GAP) -> None:
        self._entries: deque[Entry] = deque()
        self.gap = gap  # see merge_gap()
        self.requests = 0.0
        self.tokens = 0.0

    def __repr__(self) -> str:
        return (
            f"<WindowLog [{len(self._entries)} entries: {self.requests:g} requests, {self.tokens:g} tokens]>"
        )

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries)

    @property
    def last(self) -> float:
        """The time of the latest entry (a reservation may be in the future), ``-inf`` when empty."""
        return self._entries[-1].at if self._entries else -math.inf

    def expire(self, now: float) -> None:
        """Drop the entries no window that contains ``now`` counts (``at + WINDOW <= now``)."""
        entries = self._entries
        while entries and entries[0].at + WINDOW <= now:
            gone = entries.popleft()
            gone.alive = False
            self.requests -= gone.requests
            self.tokens -= gone.tokens
        if not entries:
            self.requests = self.tokens = 0.0  # no drift from float sums

    def earliest(self, now: float, requests: float, tokens: float, rpm: float, tpm: float) -> float:
        """The first instant, not before ``now`` nor before the latest entry, at which ``requests`` and
        ``tokens`` more fit ``rpm`` / ``tpm`` (0: no limit) in the window ending there; ``inf`` if they
        never can (more than a limit alone)."""
        start = max(now, self.last)
        excess_requests = self.requests + requests - rpm if rpm > 0 else -math.inf
        excess_tokens = self.tokens + tokens - tpm if tpm > 0 else -math.inf
        if excess_requests <= 0 and excess_tokens <= 0:
            return start
        freed_requests = freed_tokens = 0.0
        for entry in self._entries:  # oldest first: what leaves the window first
            freed_requests += entry.requests
            freed_tokens += entry.tokens
            if freed_requests >= excess_requests and freed_tokens >= excess_tokens:
                return max(start, entry.at + WINDOW)
        return math.inf

    def add(self, at: float, requests: float, tokens: float, tag: str = "") -> Entry:
        """Record a grant at ``at``; merged into the latest entry when within :attr:`gap` after it and
        of the same ``tag``. Returns the entry that holds it."""
        entries = self._entries
        if entries and at < entries[-1].at:
            return self.insert(at, requests, tokens, tag)
        if entries and (latest := entries[-1]).mergeable and latest.tag == tag and at - latest.at < self.gap:
            latest.at = at
            latest.requests += requests
            latest.tokens += tokens
            entry = latest
        else:
            entry = Entry(at, requests, tokens, tag)
            entries.append(entry)
        self.requests += requests
        self.tokens += tokens
        return entry

    def insert(self, at: float, requests: float, tokens: float, tag: str) -> Entry:
        """Record an entry at ``at``, wherever it falls in time (never merged, nor merged into)."""
        entry = Entry(at, requests, tokens, tag, mergeable=False)
        entries = self._entries
        position = len(entries)
        while position > 0 and entries[position - 1].at > at:
            position -= 1
        entries.insert(position, entry)
        self.requests += requests
        self.tokens += tokens
        return entry

    def correct(self, entry: Entry, requests: float, tokens: float, now: float) -> None:
        """Change an entry's charge by ``requests`` / ``tokens`` (never below zero). Once the entry has
        left the window, nothing can be taken back, and tokens added are charged at ``now``: a call
        that outlived its grant's minute used them within the last one (the shared log does the same)."""
        if not entry.alive or entry.at + WINDOW <= now:
            if tokens > 0:
                self.insert(now, 0.0, tokens, entry.tag)
            return
        requests = max(requests, -entry.requests)
        tokens = max(tokens, -entry.tokens)
        entry.requests += requests
        entry.tokens += tokens
        self.requests += requests
        self.tokens += tokens


def refuse(name: str, wait: float) -> RateLimitWaitError:
    """The error of a wait for quota that would not end, with the call after it, before the deadline."""
    return RateLimitWaitError(
        f"{name} limit: the {wait:.3f}s wait for capacity and the call would pass the deadline",
        retry_after=wait,
    )


class LocalGrant:
    """One call's share of a :class:`LocalQuota`: commit it once sent, or refund it if never sent."""

    __slots__ = ("_entry", "_estimate", "_log", "_settled")

    def __init__(self, log: WindowLog, entry: Entry, estimate: float) -> None:
        self._log = log
        self._entry = entry
        self._estimate = estimate
        self._settled = False

    def commit(self, tokens: float | None = None) -> None:
        """The call was sent; it used ``tokens`` (None: the estimate stands). Only the first of
        :meth:`commit` and :meth:`refund` counts."""
        if self._settled:
            return
        self._settled = True
        if tokens is not None:
            self._log.correct(self._entry, 0.0, tokens - self._estimate, trio.current_time())

    def refund(self) -> None:
        """The call was never sent: its request and tokens go back."""
        if self._settled:
            return
        self._settled = True
        self._log.correct(self._entry, -1.0, -self._estimate, trio.current_time())


class LocalQuota:
    """``rpm`` requests and ``tpm`` tokens in any 60-second window, for this process.

    Args:
        name: For messages (the upstream's name).
        rpm: Requests per window, or None for no request limit.
        tpm: Tokens per window, or None for no token limit.
    """

    def __init__(self, name: str, rpm: float | None, tpm: float | None) -> None:
        self.name = name
        self.rpm = rpm or 0.0
        self.tpm = tpm or 0.0
        self.log = WindowLog(merge_gap(self.rpm))
        self.waited = 0.0  # seconds callers spent waiting, in total

    def __repr__(self) -> str:
        return f"<LocalQuota {self.name} [{self.rpm:g} rpm, {self.tpm:g} tpm] {self.log!r}>"

    @property
    def max_tokens(self) -> float:
        """The largest charge one call can ever be granted (``inf`` without a token limit)."""
        return self.tpm or math.inf

    async def acquire(self, tokens: float, *, then: float = 0.0) -> LocalGrant:
        """Take one request and ``tokens`` (at most :attr:`max_tokens`), waiting for them in FIFO order.
        ``then`` is how long the call takes once granted: a wait that would not end ``then`` seconds
        before the deadline is refused at once.

        Raises:
            RateLimitWaitError: at once, when the wait and ``then`` would pass the caller's deadline
                (nothing was taken).
        """
        await trio.lowlevel.checkpoint_if_cancelled()  # a cancelled scope's -inf deadline is no refusal
        now = trio.current_time()
        log = self.log
        log.expire(now)
        at = log.earliest(now, 1.0, tokens, self.rpm, self.tpm)
        wait = at - now
        if wait > 0 and at + then >= trio.current_effective_deadline():
            raise refuse(self.name, wait)
        grant = LocalGrant(log, log.add(at, 1.0, tokens), tokens)
        try:
            if wait > 0:
                try:
                    await trio.sleep_until(at)
                finally:
                    self.waited += trio.current_time() - now
            else:
                await trio.lowlevel.checkpoint()
        except BaseException:
            grant.refund()
            raise
        return grant
