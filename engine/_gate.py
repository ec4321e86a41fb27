"""A request's way in and out: its tenant's own limits, then a slot; the slot back, then its tenant's books.

::

    gate.check(tenant)                  # at acceptance: the engine's and the tenant's queues (sync)
    await gate.enter(request)           # rate window and budget, then a slot in fair order
    ...                                 # the program runs
    gate.leave(request)                 # the slot back (the next queued request starts)
    gate.settle(request)                # when it ended: tokens, usage and cost to its tenant

Refusals come at once and in this order, cheapest first: the engine's queue or the tenant's caps full
(:class:`OverloadedError`, :class:`TenantOverloadedError`), the budget spent
(:class:`BudgetExceededError`), the rate window full (:class:`TenantRateLimitedError`), the deadline
unmeetable (:class:`DeadlineUnmeetableError`). Whatever the rate window granted is given back if the
request never got a slot.
"""

from __future__ import annotations

from collections.abc import Mapping

import trio

from ._admission import Admission
from ._budget import Price
from ._fair_queue import Ticket
from ._request import Request
from ._tenants import Tenant, Tenants


class Gate:
    """The tenants and the admission of one engine, in the order a request meets them.

    Args:
        tenants: The engine's tenants.
        admission: Its slots and fair queue.
        prices: The price of each LM that has one, by LM name.
        program_lms: The LM of each program, by program name.
    """

    def __init__(
        self,
        tenants: Tenants,
        admission: Admission,
        prices: Mapping[str, Price],
        program_lms: Mapping[str, str],
    ) -> None:
        self.tenants = tenants
        self.admission = admission
        self._prices = dict(prices)
        self._program_lms = dict(program_lms)

    def __repr__(self) -> str:
        return f"<Gate {self.tenants!r} {self.admission!r}>"

    def check(self, tenant: Tenant | None = None) -> None:
        """Raise now what a request of ``tenant`` would be refused with, as far as this process knows:
        the queues (:meth:`Admission.check`), the tenant's budget and rate window (:meth:`Tenants.peek`;
        a shared limit may still refuse at :meth:`enter`). Takes nothing; does not block."""
        if tenant is None:
            self.admission.check()
            return
        self.admission.check(tenant.lane)
        self.tenants.peek(tenant)

    async def enter(self, request: Request) -> None:
        """Pass ``request``'s tenant limits, then wait for a slot in fair order.

        Blocks for a round-trip to a cluster's Redis (tenants with a rate limit or budget only), then
        while queued; the caller's scope bounds both.

        Raises:
            OverloadedError: or one of its kinds, at once (see the module docstring).
        """
        tenant = request.tenant
        assert tenant is not None
        if tenant.quota is not None or tenant.budget is not None:
            request.tenant_pass = await self.tenants.admit(tenant)
        request.ticket = ticket = Ticket(tenant.lane)
        await self.admission.acquire(ticket)
        request.admitted = trio.current_time()

    def leave(self, request: Request) -> None:
        """Give ``request``'s slot back (it must hold one). Never blocks."""
        assert request.ticket is not None
        self.admission.release(request.ticket, service_time=trio.current_time() - request.admitted)

    def settle(self, request: Request) -> float:
        """Book an ended request for its tenant; returns its cost in USD. Never blocks."""
        tenant = request.tenant
        if tenant is None:
            return 0.0
        usage = request.result.usage if request.result is not None else None
        ran = request.ticket is not None and request.admitted == request.admitted  # admitted is not NaN
        if request.outcome is not None:
            self.tenants.count(tenant, request.outcome)
        return self.tenants.settle(
            tenant, request.tenant_pass, ran=ran, usage=usage, cost=self._cost(request)
        )

    def _cost(self, request: Request) -> float:
        """What ``request``'s LM calls cost, each at the price of the LM that answered it (a fallback's
        when the first LM failed; nothing for an answer shared or read from the cache, which used no
        tokens of its own); 0 without a result."""
        result = request.result
        if result is None:
            return 0.0
        if not result.lm_calls:  # a program that reports no calls: its usage, at its own LM's price
            price = self._prices.get(self._program_lms.get(request.program.name, ""))
            usage = result.usage
            return price.cost(usage.prompt_tokens, usage.completion_tokens) if price is not None else 0.0
        return sum(
            price.cost(call.prompt_tokens, call.completion_tokens)
            for call in result.lm_calls
            if (price := self._prices.get(call.lm)) is not None
        )
