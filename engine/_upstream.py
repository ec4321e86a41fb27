"""The policies around every LM call to one upstream: cool-down, rate limits, adaptive concurrency,
cascading timeouts and retries. All waits live inside the caller's deadline.

One attempt goes: ask the LM's circuit breaker, if it has one (an open breaker fails the call at once,
see :mod:`._breaker`) -> wait out a shared cool-down (set by the ``Retry-After`` of a 429, 503, 529..., so one
rate limit does not become a storm) -> take an adaptive-concurrency slot -> take a request and an
estimate of its tokens from the RPM/TPM quota (at most ``rpm`` requests and ``tpm`` tokens in any
60 seconds) -> if a cool-down began during those waits, give the quota back and wait it out first ->
run the attempt under the per-attempt timeout, and for streams the first-token and inter-token stall
timeouts. The quota is taken inside the slot, so that a call is sent the moment it is granted (grants
spread over time are never bunched up by a wait after them). A wait for quota that would leave the call
no time before the deadline (the call's typical duration, as measured) is refused at once. On a
retryable failure: back off (full jitter, never before ``Retry-After``, never past the deadline, within
the retry budget, and only while the breaker stayed closed) and go again. The TPM charge is corrected
with the real usage.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from contextlib import nullcontext

import attrs
import trio

from ._adaptive import AdaptiveLimit, AdaptiveSettings
from ._breaker import CircuitBreaker
from ._errors import RateLimitWaitError, UpstreamError, UpstreamTimeoutError
from ._limits import Grant, Limits, LocalLimits
from ._retry import RetryBudget, RetryPolicy, seeded
from ._telemetry import span
from ._trace import record_attempt
from .lm._base import Completion, DeltaSink

_NO_SCOPE = nullcontext()

Attempt = Callable[[DeltaSink | None], Awaitable[Completion]]


@attrs.frozen
class UpstreamPolicy:
    """Everything that governs calls to one upstream. ``None`` disables a limit.

    Attributes:
        rpm: Requests per minute.
        tpm: Tokens (prompt + completion) per minute; charged with an estimate, corrected after.
        retry: Which failures are retried, how, and how often.
        attempt_timeout: Seconds one attempt may take in total.
        first_token_timeout: Seconds a stream may take to deliver its first chunk.
        stall_timeout: Seconds a stream may stay silent between chunks (time the consumer holds the
            stream back does not count).
        adaptive: Adaptive concurrency bounds, or None for no per-upstream concurrency limit.
    """

    rpm: float | None = None
    tpm: float | None = None
    retry: RetryPolicy = attrs.field(factory=RetryPolicy)
    attempt_timeout: float | None = None
    first_token_timeout: float | None = None
    stall_timeout: float | None = None
    adaptive: AdaptiveSettings | None = None


@attrs.frozen
class UpstreamStatistics:
    """A snapshot of one upstream's policies.

    Attributes:
        concurrency_limit: The adaptive limit now (None when not adaptive).
        in_use: Calls holding an adaptive slot.
        retries_by_cause: Retries made, by cause (``rate_limited``, ``server_error``, ``connection``,
            ``timeout``).
        rate_limit_wait_seconds: Time calls spent waiting for RPM/TPM capacity or a cool-down.
        cooldown_remaining: Seconds until calls may go again after a ``Retry-After``, 0 when none.
    """

    concurrency_limit: float | None
    in_use: int
    retries_by_cause: Mapping[str, int]
    rate_limit_wait_seconds: float
    cooldown_remaining: float


class _WatchedSink:
    """A chunk sink that moves a watchdog's deadline: the first-token timeout until the first chunk,
    then the stall timeout after each one. The wait inside ``send`` (a slow consumer) is not counted.

    Without a ``sink`` (a call sent upstream as a stream that nobody reads chunk by chunk) it watches
    and forwards nothing: ``heard`` says a chunk arrived, ``delivered`` that a consumer got one (which
    cannot be taken back by a retry)."""

    def __init__(
        self, sink: DeltaSink | None, watchdog: trio.CancelScope, stall_timeout: float | None
    ) -> None:
        self._sink = sink
        self._watchdog = watchdog
        self._stall_timeout = stall_timeout
        self.heard = False

    @property
    def delivered(self) -> bool:
        return self.heard and self._sink is not None

    async def send(self, text: str) -> None:
        self.heard = True
        if self._watchdog.deadline != math.inf:  # setting a deadline is not free: only when it changes
            self._watchdog.deadline = math.inf
        if self._sink is not None:
            await self._sink.send(text)
        if self._stall_timeout is not None:
            self._watchdog.deadline = trio.current_time() + self._stall_timeout


def _failed_usage(watched: _WatchedSink | None) -> float | None:
    """The tokens a failed attempt settles its grant with: none, unless its stream had sent tokens
    (then None: the estimate stands, the engine knowing no better count)."""
    return None if watched is not None and watched.heard else 0.0


class UpstreamGuard:
    """Applies an :class:`UpstreamPolicy` to the calls of one LM backend.

    Args:
        name: The upstream's name (for messages and statistics).
        policy: The policy.
        jitter: ``uniform(a, b)`` used for backoff jitter; pass ``seeded(n)`` for reproducible tests.
        limits: Where the RPM/TPM quota and the cool-down live: this process (default), or shared by
            every process of a cluster (``dspy_trio.engine.cluster``).
        breaker: The upstream's circuit breaker, asked before every attempt and told its result; None
            for none.
    """

    def __init__(
        self,
        name: str,
        policy: UpstreamPolicy,
        *,
        jitter: Callable[[float, float], float] | None = None,
        limits: Limits | None = None,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self.name = name
        self.breaker = breaker
        self.policy = policy
        limits = limits or LocalLimits()
        self._quota = limits.quota(name, policy.rpm, policy.tpm) if policy.rpm or policy.tpm else None
        self._typical_call = 0.0  # seconds a successful attempt takes (a moving average)
        self._adaptive = AdaptiveLimit(policy.adaptive) if policy.adaptive else None
        self._budget = RetryBudget(policy.retry)
        self._uniform = jitter or seeded()
        self._cooldown = limits.cooldown(name, max_wait=policy.retry.max_retry_after)
        self._cooldown_waited = 0.0
        self._cooldown_waiters: set[trio.CancelScope] = set()
        self.retries: Counter[str] = Counter()

    @property
    def _cooldown_until(self) -> float:
        return self._cooldown.until

    @_cooldown_until.setter
    def _cooldown_until(self, until: float) -> None:
        self._cooldown.extend_to(until)

    def __repr__(self) -> str:
        return f"<UpstreamGuard {self.name} {self.statistics()}>"

    def statistics(self) -> UpstreamStatistics:
        waited = self._cooldown_waited + (self._quota.waited if self._quota is not None else 0.0)
        return UpstreamStatistics(
            concurrency_limit=self._adaptive.limit if self._adaptive else None,
            in_use=self._adaptive.in_use if self._adaptive else 0,
            retries_by_cause=dict(self.retries),
            rate_limit_wait_seconds=waited,
            cooldown_remaining=max(0.0, self._cooldown_until - trio.current_time()),
        )

    async def _wait_cooldown(self) -> None:
        """Wait until no cool-down remains. A longer ``Retry-After`` that arrives meanwhile extends the
        wait; one that would end past the deadline fails at once, when it becomes known."""
        await trio.lowlevel.checkpoint_if_cancelled()  # a cancelled scope's -inf deadline is no refusal
        started = trio.current_time()
        if self._cooldown_until <= started:  # the usual case: no cool-down, nothing waited
            return
        try:
            while (until := self._cooldown_until) > trio.current_time():
                if until > trio.current_effective_deadline():
                    wait = until - trio.current_time()
                    raise RateLimitWaitError(
                        f"{self.name}: the upstream's {wait:.3f}s cool-down would pass the deadline",
                        retry_after=wait,
                    )
                with trio.CancelScope() as waiting:
                    self._cooldown_waiters.add(waiting)
                    try:
                        await trio.sleep_until(until)
                    finally:
                        self._cooldown_waiters.discard(waiting)
        finally:
            self._cooldown_waited += trio.current_time() - started

    def _extend_cooldown(self, retry_after: float) -> None:
        """Hold calls off for ``retry_after`` seconds from now; wake the waiters to re-check."""
        until = trio.current_time() + retry_after
        if until > self._cooldown_until:
            self._cooldown_until = until
            for waiting in self._cooldown_waiters:
                waiting.cancel()

    async def call(
        self, attempt: Attempt, sink: DeltaSink | None, *, estimate: float, streamed: bool = False
    ) -> Completion:
        """Run ``attempt`` under the policy, retrying as allowed. Blocks for waits and attempts.

        An attempt is watched as a stream (first-token and stall timeouts) when it has a ``sink``, or
        when it is ``streamed`` upstream without one; the latter is given a sink that forwards nothing,
        so that the backend reports its progress.

        Raises:
            UpstreamError: the last attempt's error, when no retry is allowed (or the wait for one
                would pass the deadline).
            RateLimitWaitError: a wait for a cool-down or for quota would pass the deadline (for quota:
                with the call's typical duration after it).
            CircuitOpenError: the breaker is open (nothing was sent, nothing waited for).
        """
        breaker = self.breaker
        # Asked first: a call the open breaker refuses is no request of the retry budget (never sent).
        ticket = None if breaker is None else (breaker.ticket_if_closed or await breaker.admit())
        self._budget.record_request()
        retry = 0
        while True:
            if retry and breaker is not None:
                ticket = breaker.ticket_if_closed or await breaker.admit()
            watchdog = trio.CancelScope()
            streams = sink is not None or streamed
            watched = _WatchedSink(sink, watchdog, self.policy.stall_timeout) if streams else None
            try:
                completion = await self._attempt(attempt, watched, watchdog, estimate)
            except UpstreamError as error:
                if (asked := self.policy.retry.retry_after(error)) is not None:  # capped by the policy
                    self._extend_cooldown(asked)
                if breaker is not None and ticket is not None:
                    breaker.failed(ticket, error, asked)
                retry += 1
                delivered = watched is not None and watched.delivered  # a stream cannot be taken back
                if not error.retryable or delivered or retry >= self.policy.retry.max_attempts:
                    raise
                if breaker is not None and ticket is not None and not breaker.allows_retry(ticket):
                    raise  # the breaker opened: no waiting on an upstream known to be failing
                wait = self.policy.retry.backoff(retry, error, self._uniform)
                if trio.current_time() + wait > trio.current_effective_deadline():
                    raise
                if not self._budget.try_spend():
                    raise
                self.retries[error.retry_cause or "other"] += 1
                await trio.sleep(wait)
                continue
            except BaseException:
                if breaker is not None and ticket is not None:
                    breaker.release(ticket)
                raise
            if breaker is not None and ticket is not None:
                breaker.succeeded(ticket)
            return completion

    async def _admitted(self, owner: object, estimate: float) -> tuple[int, Grant | None]:
        """Wait until the upstream may be called: no cool-down, an adaptive slot held for ``owner``, the
        quota granted, and still no cool-down after those waits (one that began meanwhile gives the
        quota and the slot back and is waited out first). Returns the slot's call number and the grant.

        Raises:
            RateLimitWaitError: a wait would pass the deadline.
        """
        while True:
            await self._wait_cooldown()
            call = await self._adaptive.acquire(owner) if self._adaptive else 0
            grant: Grant | None = None
            try:
                if self._quota is not None:
                    tokens = min(estimate, self._quota.max_tokens)
                    grant = await self._quota.acquire(tokens, then=self._typical_call)
                if self._cooldown_until <= trio.current_time():
                    return call, grant
            except BaseException:
                if self._adaptive is not None:
                    self._adaptive.release(owner, call, latency=None, overloaded=False)
                raise
            if grant is not None:
                grant.refund()
            if self._adaptive is not None:
                self._adaptive.release(owner, call, latency=None, overloaded=False)

    async def _attempt(
        self, attempt: Attempt, watched: _WatchedSink | None, watchdog: trio.CancelScope, estimate: float
    ) -> Completion:
        """One attempt once admitted, under the per-attempt timeout and the stream watchdog. Settles the
        quota: the real usage on success; on an upstream error or a timeout, no tokens unless a stream
        had sent some (the upstream generated and counts them: the estimate stands, as it does for a
        call cancelled after it was sent)."""
        policy = self.policy
        owner = object()
        call, grant = await self._admitted(owner, estimate)
        started = trio.current_time()
        latency: float | None = None
        overloaded = False
        used: float | None = None  # tokens to commit; None: the estimate stands (the call was sent)
        record_attempt()
        if watched is not None and policy.first_token_timeout is not None:
            watchdog.deadline = started + policy.first_token_timeout
        whole = trio.CancelScope(deadline=started + (policy.attempt_timeout or math.inf))
        try:
            # The watchdog (first token, stalls) only watches a stream; a plain call has one scope.
            with (
                span("dspy_trio.lm_attempt", upstream=self.name),
                whole,
                watchdog if watched is not None else _NO_SCOPE,
            ):
                try:
                    completion = await attempt(watched)
                except UpstreamError as error:
                    overloaded = error.pushback
                    used = _failed_usage(watched)
                    raise
                latency = trio.current_time() - started
                used = float(completion.usage.get("total_tokens") or 0) or estimate
                self._typical_call = (
                    latency if not self._typical_call else 0.8 * self._typical_call + 0.2 * latency
                )
                return completion
            overloaded = True
            used = _failed_usage(watched)
            raise UpstreamTimeoutError(self._timeout_message(whole, watched), model=self.name)
        finally:
            if grant is not None:
                grant.commit(used)
            if self._adaptive is not None:
                self._adaptive.release(owner, call, latency=latency, overloaded=overloaded)

    def _timeout_message(self, whole: trio.CancelScope, watched: _WatchedSink | None) -> str:
        if whole.cancelled_caught:
            return f"{self.name}: no complete answer within {self.policy.attempt_timeout:g}s"
        if watched is not None and watched.heard:
            return f"{self.name}: the stream stalled for {self.policy.stall_timeout:g}s"
        return f"{self.name}: no first token within {self.policy.first_token_timeout:g}s"
