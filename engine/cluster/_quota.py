"""The RPM/TPM quota of an upstream, shared by every process through Redis: at most ``rpm`` requests and
``tpm`` tokens in any 60-second window, across all of them.

The window log of :mod:`dspy_trio.engine._rate_window` lives in one Redis key, and one Lua script does all of
an acquire on the server in a single step (expire, correct, merge, reserve), so two processes can never
both take the last request. Taking reserves the first instant that fits, after every reservation made
before (first come, first served across the cluster); a wait that would not end, with the call's
typical duration after it and the Redis round-trip counted, before the caller's deadline reserves
nothing and fails at once. One round-trip per acquire, three Redis commands (EVALSHA, GET, SET);
corrections (TPM's real usage, a call never sent) ride along with the next one, or the heartbeat.

"Now" is Redis's own clock (``TIME``, read by the script): a process sends only durations (a wait's
bound, how long ago each grant it sends was made), never an instant, so a process whose clock is off
(a VM without NTP, a host back from suspend) neither frees the others' grants early nor dates its own
in the past. Tests put one stand-in clock in place of ``TIME`` for every process
(:func:`~dspy_trio.engine.cluster._redis.stand_in_for_redis_time`), so that a ``MockClock`` drives the
shared log exactly.

What nobody knows is assumed to have happened at the worst moment:

- **Redis loses the log** (FLUSHALL, a restart without persistence): the log is recreated with the whole
  quota marked used at that instant (a missing log never starts full), in a new *epoch*. Every process
  that knew the old epoch sends its own grants of the last minute (each process keeps them, see
  ``mirror``; at its next call, or its heartbeat when idle), which replace as much of the unknown at
  their real times, so that they leave the window when they really do. The rest of the unknown is
  freed once as many processes have sent theirs as the most that any caller counted since the loss,
  and not before three heartbeat intervals after it: a count made before every live process has
  beaten again may lack one that joined just before the loss (its grants would be granted again);
  until then, what no process sent leaves the window a minute after the loss (a process gone since
  the loss, for one). A process that never reached Redis cannot tell a lost log from a new
  deployment's and creates a missing one empty; the first call of a process that knew the lost one
  marks the minute's use unknown again, on top of what was logged since.
- **Redis is unreachable**: each process falls back to a local window with its share of the quota (the
  quota divided by the processes counted at the last heartbeat), holding its own grants of the last
  minute and, for the others', what the shared log last told it was still free, split evenly: across all
  processes the upstream sees at most the quota meanwhile. When Redis answers again, the grants made
  locally are sent to the shared log (charged back), and the local share stays in force for one more
  minute, until every process's local grants are in the shared log.
"""

from __future__ import annotations

import math
import os
from typing import Any

import trio

from .._rate_window import WINDOW, Entry, LocalGrant, LocalQuota, WindowLog, refuse
from ._quota_script import KEY_TTL, QUOTA_SCRIPT, Reply
from ._redis import Late, RedisLateError, RedisLink, RedisUnavailableError, redis_time_argument

_LONGEST_WAIT = 1e9  # "no deadline", as a number Lua can read
_RESENDS = 3  # epoch changes one acquire follows before it gives up on the shared log
_SETTLE_BEATS = 3  # heartbeat intervals after a loss before a count of processes may free its unknown
_SENDING = "\x00sending"  # the tag of a mirror entry a call is sending to the shared log


class SharedGrant:
    """One call's request and tokens, taken from the shared log."""

    __slots__ = ("_entry", "_epoch", "_estimate", "_quota", "_seq", "_settled")

    def __init__(self, quota: SharedQuota, seq: int, epoch: str, entry: Entry, estimate: float) -> None:
        self._quota = quota
        self._seq = seq
        self._epoch = epoch
        self._entry = entry
        self._estimate = estimate
        self._settled = False

    def commit(self, tokens: float | None = None) -> None:
        if self._settled:
            return
        self._settled = True
        if tokens is not None:
            self._quota._correct(self._seq, self._epoch, self._entry, 0.0, tokens - self._estimate)

    def refund(self) -> None:
        if self._settled:
            return
        self._settled = True
        self._quota._correct(self._seq, self._epoch, self._entry, -1.0, -self._estimate)


class ShareGrant:
    """One call's request and tokens, taken from this process's local share (Redis unreachable)."""

    __slots__ = ("_entry", "_estimate", "_local", "_mirror", "_settled")

    def __init__(self, local: LocalGrant, mirror: WindowLog, entry: Entry, estimate: float) -> None:
        self._local = local
        self._mirror = mirror
        self._entry = entry
        self._estimate = estimate
        self._settled = False

    def commit(self, tokens: float | None = None) -> None:
        if self._settled:
            return
        self._settled = True
        self._local.commit(tokens)
        if tokens is not None:
            self._mirror.correct(self._entry, 0.0, tokens - self._estimate, trio.current_time())

    def refund(self) -> None:
        if self._settled:
            return
        self._settled = True
        self._local.refund()
        self._mirror.correct(self._entry, -1.0, -self._estimate, trio.current_time())


class SharedQuota:
    """``rpm`` requests and ``tpm`` tokens in any 60 seconds, shared through Redis (see the module
    docstring). Satisfies the :class:`dspy_trio.engine._limits.Quota` port.

    Args:
        link: The process's Redis link.
        upstream: The upstream's name (the key is ``prefix:quota:upstream``).
        rpm: Requests per window, or None.
        tpm: Tokens per window, or None.
    """

    def __init__(self, link: RedisLink, upstream: str, rpm: float | None, tpm: float | None) -> None:
        if not (rpm or tpm):
            raise ValueError("a quota needs a request or a token limit")
        self._link = link
        self.name = upstream
        self.rpm = rpm or 0.0
        self.tpm = tpm or 0.0
        self.key = link.key("quota", upstream)
        self._script = link.client.register_script(QUOTA_SCRIPT)
        # This process's own grants of the last minute (Trio's clock), each tagged with the epoch of the
        # shared log that holds it ("": none yet): what it sends when the log was lost, or after an outage.
        self.mirror = WindowLog()
        self.epoch = ""  # the shared log's epoch this process knows
        self._candidate = os.urandom(8).hex()  # the epoch of a log this process would create
        self._first_in_epoch = False
        self._last_contact = -math.inf  # when the last answered call was sent (Trio's clock)
        self._usage: tuple[float, float] | None = None  # the window's totals at the last answer
        self._corrections: list[tuple[int, float, float]] = []  # (seq, requests, tokens) of this epoch
        self._unmerged: list[Entry] = []  # may hold mirror entries the shared log lacks (see _take_unmerged)
        self._share: LocalQuota | None = None  # the local share, while Redis is (or just was) unreachable
        self._share_until = -math.inf  # when Redis answers again: the share's last minute ends then
        self._waited = 0.0
        self._left = 0  # calls whose caller left before the reply, their outcome still to come
        self._all_settled = trio.Event()  # set when _left falls to 0

    def __repr__(self) -> str:
        return f"<SharedQuota {self.key} [{self.rpm:g} rpm, {self.tpm:g} tpm]>"

    @property
    def max_tokens(self) -> float:
        return self.tpm or math.inf

    @property
    def waited(self) -> float:
        return self._waited + (self._share.waited if self._share is not None else 0.0)

    # --- acquiring ---------------------------------------------------------------------------------

    async def acquire(
        self, tokens: float, *, then: float = 0.0, max_wait: float = math.inf
    ) -> SharedGrant | ShareGrant:
        """Take one request and ``tokens`` from the shared log, waiting for them within the caller's
        deadline (``then`` seconds must still fit after the wait) for at most ``max_wait`` seconds (0:
        take them now or not at all).

        Blocks for one Redis round-trip (at most ``call_timeout``; two when the log was just lost) and
        then for the wait, if any. While Redis is unreachable, the local share decides, without Redis.

        Raises:
            RateLimitWaitError: at once, when the wait and ``then`` could not end before the deadline,
                or the wait is longer than ``max_wait``.
        """
        if self._share_in_force():
            return await self._acquire_share(tokens, then, max_wait)
        try:
            return await self._acquire_shared(tokens, then, max_wait)
        except RedisUnavailableError:
            return await self._acquire_share(tokens, then, max_wait)

    def peek(self, tokens: float) -> float:
        """The local share's wait while it is in force; otherwise 0: only the shared log knows, and an
        acquire asks it."""
        if self._share is not None and self._share_in_force():
            return self._share.peek(tokens)
        return 0.0

    async def _acquire_shared(self, tokens: float, then: float, longest: float) -> SharedGrant:
        await trio.lowlevel.checkpoint_if_cancelled()  # a cancelled scope's -inf deadline is no refusal
        for _ in range(_RESENDS):
            started = trio.current_time()
            left = trio.current_effective_deadline() - started
            max_wait = left - then - self._link.rtt if math.isfinite(left) else _LONGEST_WAIT
            reply = await self._run(1.0, tokens, min(max_wait, longest))
            if reply.status != "epoch":
                break
        else:
            raise RedisUnavailableError(f"{self.key}: the shared log changed epoch {_RESENDS} times")
        if reply.status == "wait":
            await trio.lowlevel.checkpoint_if_cancelled()  # cancelled meanwhile: that, not a refusal
            raise refuse(self.name, reply.wait)
        at = started + reply.wait
        if reply.wait > 0 and at + then >= trio.current_effective_deadline():  # the round trip ate it
            self._corrections.append((reply.seq, -1.0, -tokens))
            await trio.lowlevel.checkpoint_if_cancelled()  # cancelled meanwhile: that, not a refusal
            raise refuse(self.name, at - trio.current_time())
        self.mirror.expire(trio.current_time())
        grant = SharedGrant(
            self, reply.seq, reply.epoch, self.mirror.add(at, 1.0, tokens, reply.epoch), tokens
        )
        if at > trio.current_time():  # else the round trip was the checkpoint
            try:
                await trio.sleep_until(at)
            except BaseException:
                grant.refund()
                raise
            finally:
                self._waited += trio.current_time() - started
        return grant

    def _share_in_force(self) -> bool:
        """Whether the local share decides: Redis is unreachable, or answered again less than a minute
        ago (until every process's local grants reached the shared log)."""
        if self._link.degraded:
            return True
        if self._share is None:
            return False
        now = trio.current_time()
        if self._share_until == -math.inf:
            self._share_until = now + WINDOW
        if now < self._share_until:
            return True
        self._share, self._share_until = None, -math.inf
        return False

    async def _acquire_share(self, tokens: float, then: float, max_wait: float) -> ShareGrant:
        share = self._share if self._share is not None else self._open_share()
        local = await share.acquire(tokens, then=then, max_wait=max_wait)
        now = trio.current_time()
        self.mirror.expire(now)
        entry = self.mirror.add(now, 1.0, tokens, "")
        self._unmerged.append(entry)
        return ShareGrant(local, self.mirror, entry, tokens)

    def _open_share(self) -> LocalQuota:
        """The local share: quota / processes, holding this process's own grants of the last minute and,
        once the shared log was reached, the others' possible use of what it last saw free."""
        processes = max(1, self._link.processes)
        rpm, tpm = self.rpm / processes, self.tpm / processes
        share = LocalQuota(f"{self.name} (local share)", rpm or None, tpm or None)
        now = trio.current_time()
        self.mirror.expire(now)
        for entry in self.mirror:
            share.log.insert(entry.at, entry.requests, entry.tokens, "own")
        if self._usage is not None:
            used_requests, used_tokens = self._usage
            free_requests = max(0.0, self.rpm - used_requests) / processes
            free_tokens = max(0.0, self.tpm - used_tokens) / processes
            unknown_requests = max(0.0, rpm - self.mirror.requests - free_requests) if rpm else 0.0
            unknown_tokens = max(0.0, tpm - self.mirror.tokens - free_tokens) if tpm else 0.0
            if unknown_requests or unknown_tokens:
                share.log.insert(now, unknown_requests, unknown_tokens, "unknown")
        self._share, self._share_until = share, -math.inf
        return share

    # --- talking to the script ---------------------------------------------------------------------

    def _take_unmerged(self) -> list[Entry]:
        """The mirror's grants the shared log lacks (made locally, or before the log was lost), marked
        as being sent: a call running meanwhile does not send them too."""
        candidates, self._unmerged = self._unmerged, []
        taken = [
            e
            for e in dict.fromkeys(candidates)
            if e.alive and e.tag not in (self.epoch, _SENDING) and (e.requests or e.tokens)
        ]
        return taken

    def _correct(self, seq: int, epoch: str, entry: Entry, requests: float, tokens: float) -> None:
        """Change a shared grant's charge: in the mirror now, in the shared log with the next call."""
        self.mirror.correct(entry, requests, tokens, trio.current_time())
        if epoch == self.epoch and (requests or (tokens and self.tpm)):  # tokens count only with a limit
            self._corrections.append((seq, requests, tokens))

    async def _run(self, requests: float, tokens: float, max_wait: float) -> Reply:
        """One call of the script with what is queued (corrections, grants the shared log lacks).
        Blocks for one bounded round-trip.

        Raises:
            RedisUnavailableError: Redis did not answer (what was queued stays queued).
        """
        link = self._link
        now = trio.current_time()
        known = self.epoch if now - self._last_contact < KEY_TTL else ""
        corrections = self._corrections
        self.mirror.expire(now)
        unmerged = self._take_unmerged()
        tags = [e.tag for e in unmerged]
        for entry in unmerged:  # a call running meanwhile must not send them too
            entry.tag = _SENDING
        first, self._first_in_epoch = self._first_in_epoch, False  # this call brings the grants
        numbers = [
            self.rpm,
            self.tpm,
            max(1, link.processes),
            requests,
            tokens,
            min(max_wait, _LONGEST_WAIT),
            1 if first else 0,
            len(corrections),
            len(unmerged),
            _SETTLE_BEATS * link.config.heartbeat_interval,
        ]
        for correction in corrections:
            numbers += correction
        for entry in unmerged:  # by its age: the script dates it on Redis's clock
            numbers += (now - entry.at, entry.requests, entry.tokens)
        args = (" ".join(map(repr, numbers)), known, self._candidate, link.process_id, redis_time_argument())
        self._corrections = []

        def not_applied() -> None:  # keep what was queued for the next call
            self._corrections = corrections + self._corrections
            for entry, tag in zip(unmerged, tags, strict=True):
                entry.tag = tag
            self._unmerged += unmerged
            self._first_in_epoch = self._first_in_epoch or first

        gone = False  # the caller left while the script ran: flush() waits for its outcome

        def left() -> None:
            nonlocal gone
            gone = True
            if not self._left:
                self._all_settled = trio.Event()
            self._left += 1

        def late(outcome: Late[Any]) -> None:
            """The caller left before the reply: what the script did still counts, and a request it
            reserved for the caller, never sent, is given back with the next call."""
            if outcome.error is not None:
                not_applied()
            else:
                reply = self._applied(Reply.parse(outcome.reply), now, unmerged, tags)
                if reply.status == "ok":
                    self._correct_shared(reply.seq, reply.epoch, -requests, -tokens)
            if gone:
                self._left -= 1
                if not self._left:
                    self._all_settled.set()

        async def script() -> Any:
            return await self._script(keys=[self.key], args=args)

        try:
            # Detached: a caller that leaves (its deadline, or call_timeout) must not leave a reservation
            # behind, nor send its corrections twice when the script ran after all.
            raw = await link.call_detached(script, late, left)
        except (trio.Cancelled, RedisLateError):
            if link.nursery is None:
                not_applied()
            raise  # (else its outcome goes to late())
        except BaseException:
            not_applied()
            raise
        return self._applied(Reply.parse(raw), now, unmerged, tags)

    def _correct_shared(self, seq: int, epoch: str, requests: float, tokens: float) -> None:
        """Queue a change of a grant in the shared log only (it has no mirror entry)."""
        if epoch == self.epoch and (requests or (tokens and self.tpm)):
            self._corrections.append((seq, requests, tokens))

    def _applied(self, reply: Reply, now: float, unmerged: list[Entry], tags: list[str]) -> Reply:
        """Take in what a call of the script did: the epoch, where the sent grants now are, the totals."""
        self._last_contact = now
        if reply.status == "epoch":
            self._corrections = []  # they belong to the old epoch (the mirror holds their effect)
            for entry, tag in zip(unmerged, tags, strict=True):
                entry.tag = tag
            self.epoch, self._first_in_epoch = reply.epoch, True
            self._candidate = os.urandom(8).hex()
            self._unmerged = list(self.mirror)  # none of them is in the log of this epoch
            return reply
        for entry in unmerged:
            entry.tag = reply.epoch
        self._usage = (reply.requests, reply.tokens)
        return reply

    async def flush(self, idle_after: float) -> None:
        """Send what is queued, and if this process has not talked to the shared log for ``idle_after``
        seconds, check in anyway (so that a lost log learns its grants within a heartbeat). The
        heartbeat calls this. Blocks for one or two bounded round-trips, after the replies to calls
        whose caller left (at most ``call_timeout``): what they reserved is queued to be given back."""
        if self._left:
            with trio.move_on_after(self._link.config.call_timeout):
                await self._all_settled.wait()
        if self._link.degraded:
            return
        self.mirror.expire(trio.current_time())
        queued = self._corrections or any(
            e.alive and e.tag not in (self.epoch, _SENDING) for e in self._unmerged
        )
        if not queued and trio.current_time() - self._last_contact < idle_after:
            return
        try:
            for _ in range(_RESENDS):
                if (await self._run(0.0, 0.0, 0.0)).status != "epoch":
                    return
        except RedisUnavailableError:
            return

    async def usage(self) -> tuple[float, float]:
        """The shared window's requests and tokens now (tests, diagnostics). Blocks for one round-trip.

        Raises:
            RedisUnavailableError: Redis did not answer.
        """
        for _ in range(_RESENDS):
            reply = await self._run(0.0, 0.0, 0.0)
            if reply.status != "epoch":
                return reply.requests, reply.tokens
        raise RedisUnavailableError(f"{self.key}: the shared log changed epoch {_RESENDS} times")
