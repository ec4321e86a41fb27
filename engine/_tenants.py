"""Tenants at run time: each one's lane in the fair queue, its own rate limit and budget, and what it used.

Every request belongs to a tenant (``tenant=`` in the Python API; the web layer passes the tenant of the
caller's API key). A tenant configured under ``[tenants.NAME]`` has its weight, caps, rate limit and
budget; any other name is a tenant of weight 1 with no limits of its own; no name at all is the tenant
called ``default``.

Before a request is queued, :meth:`Tenants.admit` takes a request (and its tokens, estimated from the
tenant's recent requests) from the tenant's requests- and tokens-per-minute window, refusing at once
with :class:`TenantRateLimitedError` when the window is full, and refuses with
:class:`BudgetExceededError` when the tenant has spent its budget for the current window. When the
request ends, :meth:`Tenants.settle` corrects the window with the tokens it really used (or gives the
request back if it never got a slot), and counts its usage and cost (usage x the price of its LM). The
window and the budget go through the :class:`dspy_trio.engine._limits.Limits` port: this process's own,
or with a cluster, Redis, shared by every worker and replica.

A tenant's runtime is made on its first request, so 10,000 configured tenants cost their configuration
only. Tenants that were never configured are forgotten when idle once there are more than
``max_unconfigured`` of them.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from ._budget import Budget, Spent
from ._errors import BudgetExceededError, InvalidInputError, RateLimitWaitError, TenantRateLimitedError
from ._fair_queue import Lane
from ._limits import Grant, Limits, LocalLimits, Quota
from ._result import Usage
from ._tenant_config import TenantConfig

DEFAULT_TENANT = "default"
_TOKENS_ALPHA = 0.2  # weight of the newest request in a tenant's tokens-per-request average
_MAX_NAME = 256


@attrs.frozen
class TenantStatistics:
    """A snapshot of one tenant.

    Attributes:
        weight: Its share relative to the others.
        in_flight, queued: Its requests holding a slot, and waiting for one.
        requests: Its requests that ended, by outcome.
        prompt_tokens, completion_tokens: Tokens its requests used.
        cost_usd: What they cost, by the price table of their LMs.
    """

    weight: float
    in_flight: int
    queued: int
    requests: Mapping[str, int]
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float


class Tenant:
    """One tenant's runtime state. Get one from :meth:`Tenants.get`."""

    __slots__ = (
        "_budget",
        "_quota",
        "completion_tokens",
        "config",
        "configured",
        "cost_usd",
        "lane",
        "limits",
        "name",
        "outcomes",
        "prompt_tokens",
        "tokens_per_request",
    )

    def __init__(self, name: str, config: TenantConfig, limits: Limits, *, configured: bool) -> None:
        self.name = name
        self.config = config
        self.configured = configured
        self.limits = limits
        self.lane = Lane(
            name, config.weight, max_in_flight=config.in_flight_cap, max_queued=config.queued_cap
        )
        self._quota: Quota | None = None
        self._budget: Budget | None = None
        self.outcomes: dict[str, int] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cost_usd = 0.0
        self.tokens_per_request = 0.0

    def __repr__(self) -> str:
        return f"<Tenant {self.name} {self.lane!r}>"

    @property
    def quota(self) -> Quota | None:
        limit = self.config.rate_limit
        if self._quota is None and (limit.rpm or limit.tpm):
            self._quota = self.limits.quota(f"tenant:{self.name}", limit.rpm, limit.tpm)
        return self._quota

    @property
    def budget(self) -> Budget | None:
        if self._budget is None and self.config.budget is not None:
            self._budget = self.limits.budget(self.name, self.config.budget)
        return self._budget

    def statistics(self) -> TenantStatistics:
        return TenantStatistics(
            weight=self.lane.weight,
            in_flight=self.lane.in_flight,
            queued=self.lane.queued,
            requests=dict(self.outcomes),
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            cost_usd=self.cost_usd,
        )


class TenantPass:
    """What :meth:`Tenants.admit` took for one request: settle it once with :meth:`Tenants.settle`."""

    __slots__ = ("grant", "tenant")

    def __init__(self, tenant: Tenant, grant: Grant | None) -> None:
        self.tenant = tenant
        self.grant = grant


class Tenants:
    """The engine's tenants.

    Args:
        configs: The configured tenants by name.
        limits: Where rate windows and budgets live (this process by default, or a cluster).
        max_unconfigured: Unconfigured tenants kept at once (idle ones beyond are forgotten).
    """

    def __init__(
        self,
        configs: Mapping[str, TenantConfig] | None = None,
        *,
        limits: Limits | None = None,
        max_unconfigured: int = 10_000,
    ) -> None:
        self._configs = dict(configs or {})
        self._limits = limits or LocalLimits()
        self._live: dict[str, Tenant] = {}
        self._unconfigured = 0
        self._max_unconfigured = max_unconfigured
        self._default_config = TenantConfig()

    def __repr__(self) -> str:
        return f"<Tenants [{len(self._configs)} configured, {len(self._live)} active]>"

    def __contains__(self, name: str) -> bool:
        return name in self._configs

    def get(self, name: str | None) -> Tenant:
        """The tenant called ``name`` (None: ``default``), made on first use.

        Raises:
            InvalidInputError: ``name`` is empty or too long, or there are too many unconfigured tenants
                busy at once to take another one.
        """
        if name is None:
            name = DEFAULT_TENANT
        tenant = self._live.get(name)
        if tenant is not None:
            return tenant
        if not isinstance(name, str) or not name or len(name) > _MAX_NAME:
            raise InvalidInputError(f"a tenant's name must be 1 to {_MAX_NAME} characters", field="tenant")
        config = self._configs.get(name)
        if config is None:
            if self._unconfigured >= self._max_unconfigured:
                self._forget_idle()
                if self._unconfigured >= self._max_unconfigured:
                    raise InvalidInputError(
                        f"more than {self._max_unconfigured} unconfigured tenants are busy", field="tenant"
                    )
            self._unconfigured += 1
        tenant = Tenant(name, config or self._default_config, self._limits, configured=config is not None)
        self._live[name] = tenant
        return tenant

    def _forget_idle(self) -> None:
        for name, tenant in list(self._live.items()):
            if not tenant.configured and tenant.lane.idle:
                del self._live[name]
                self._unconfigured -= 1

    def peek(self, tenant: Tenant) -> None:
        """Raise now what :meth:`admit` would, as far as this process knows (takes nothing; a shared
        limit may still refuse at admission). Never blocks.

        Raises:
            TenantRateLimitedError, BudgetExceededError: as :meth:`admit`.
        """
        if (budget := tenant.budget) is not None:
            self._check_budget(tenant, budget.limit.usd, budget.peek())
        if (quota := tenant.quota) is not None and (wait := quota.peek(self._tokens(tenant, quota))) > 0:
            raise self._rate_limited(tenant, wait)

    def _tokens(self, tenant: Tenant, quota: Quota) -> float:
        """A request's token charge: the tenant's recent tokens per request (at least 1, at most all)."""
        return min(max(1.0, tenant.tokens_per_request), quota.max_tokens)

    def _check_budget(self, tenant: Tenant, usd: float, spent: Spent) -> None:
        if spent.usd >= usd:
            raise BudgetExceededError(
                f"tenant {tenant.name!r} spent its budget of {usd:g} USD for this window",
                retry_after=max(0.001, round(spent.ends_in, 3)),
                tenant=tenant.name,
            )

    def _rate_limited(self, tenant: Tenant, wait: float) -> TenantRateLimitedError:
        limit = tenant.config.rate_limit
        return TenantRateLimitedError(
            f"tenant {tenant.name!r} is over its rate limit ({_describe(limit.rpm, limit.tpm)})",
            retry_after=max(0.001, round(wait, 3)),
            tenant=tenant.name,
        )

    async def admit(self, tenant: Tenant) -> TenantPass:
        """Take a request from ``tenant``'s rate window and check its budget, refusing at once.

        Blocks for at most a round-trip to a cluster's Redis (none for a tenant without limits).

        Raises:
            TenantRateLimitedError: the window has no room now (``retry_after``: when it will).
            BudgetExceededError: the budget of the current window is spent (``retry_after``: its end).
        """
        if (budget := tenant.budget) is not None:
            self._check_budget(tenant, budget.limit.usd, await budget.spent())
        quota = tenant.quota
        if quota is None:
            return TenantPass(tenant, None)
        try:
            grant = await quota.acquire(self._tokens(tenant, quota), max_wait=0.0)
        except RateLimitWaitError as exc:
            raise self._rate_limited(tenant, exc.retry_after) from None
        return TenantPass(tenant, grant)

    def settle(
        self,
        tenant: Tenant,
        ticket: TenantPass | None,
        *,
        ran: bool,
        usage: Usage | None,
        cost: float,
    ) -> float:
        """Book a request's end for ``tenant``: the tokens it used into the rate window (or the request
        given back when it never ``ran``), its usage, and its ``cost`` in USD (returned, also spent
        from the budget). Never blocks."""
        tokens = usage.total_tokens if usage is not None else None
        if ticket is not None and ticket.grant is not None:
            if not ran:
                ticket.grant.refund()
            else:
                ticket.grant.commit(None if tokens is None else float(tokens))
        if usage is None:
            return 0.0
        tenant.prompt_tokens += usage.prompt_tokens
        tenant.completion_tokens += usage.completion_tokens
        average = tenant.tokens_per_request
        total = float(usage.total_tokens)
        tenant.tokens_per_request = total if not average else average + _TOKENS_ALPHA * (total - average)
        if cost:
            tenant.cost_usd += cost
            if (budget := tenant.budget) is not None:
                budget.spend(cost)
        return cost

    def count(self, tenant: Tenant, outcome: str) -> None:
        tenant.outcomes[outcome] = tenant.outcomes.get(outcome, 0) + 1

    def statistics_of(self, name: str | None) -> TenantStatistics | None:
        """One tenant's snapshot, or None if it has had no request (or was forgotten)."""
        tenant = self._live.get(DEFAULT_TENANT if name is None else name)
        return tenant.statistics() if tenant is not None else None

    def statistics(self) -> dict[str, TenantStatistics]:
        """Every tenant that has had a request since start (or since it was forgotten)."""
        return {name: tenant.statistics() for name, tenant in self._live.items()}


def _describe(rpm: float | None, tpm: float | None) -> str:
    parts = [f"{rpm:g} requests" if rpm else "", f"{tpm:g} tokens" if tpm else ""]
    return " and ".join(p for p in parts if p) + " per minute"
