"""Prometheus metrics of one engine, in a registry of its own (several engines per process, and tests,
never collide).

Per tenant, read at scrape time from the engine's tenants (nothing per request): requests by outcome,
tokens, cost in USD (``dspy_trio_cost_usd_total{tenant}``), requests in flight and queued.

Per request, labelled by ``program`` and upstream ``model``: requests by outcome, and (for requests that
got a slot) histograms of the queue wait, the time inside LM calls, the total, the engine's overhead (total
minus queue and LM time), and for streams the time to the first token of each output field; tokens in and
out. Read at scrape time
from the engine itself: in flight, queued, limits, stream deltas dropped or coalesced, and per upstream the
retries by cause, rate-limit waits, cool-down and adaptive concurrency limit; per LM with a circuit
breaker its state (0 closed, 1 half-open, 2 open), and the LM calls that fell back, by (from, to, reason).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import attrs
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ._breaker import STATE_VALUES
from ._result import Timings, Usage

if TYPE_CHECKING:
    from ._statistics import EngineStatistics

# Latency buckets from 5 ms to 5 minutes: LM calls span that whole range.
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_OVERHEAD = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


class EngineMetrics:
    """The engine's metric objects and their registry (serve it with ``generate_latest(registry)``)."""

    def __init__(self, statistics: Callable[[], EngineStatistics]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["program", "model"]
        self.requests = Counter(
            "dspy_trio_requests", "Requests by outcome.", [*labels, "outcome"], registry=self.registry
        )
        self.errors = Counter(
            "dspy_trio_errors",
            "Requests ended by an error, by code.",
            [*labels, "code"],
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "dspy_trio_queue_wait_seconds",
            "Time waiting for admission.",
            labels,
            buckets=_SECONDS,
            registry=self.registry,
        )
        self.lm_latency = Histogram(
            "dspy_trio_lm_seconds",
            "Time inside LM calls per request.",
            labels,
            buckets=_SECONDS,
            registry=self.registry,
        )
        self.total_latency = Histogram(
            "dspy_trio_request_seconds",
            "Time from arrival to outcome.",
            labels,
            buckets=_SECONDS,
            registry=self.registry,
        )
        self.overhead = Histogram(
            "dspy_trio_overhead_seconds",
            "Total minus queue and LM time.",
            labels,
            buckets=_OVERHEAD,
            registry=self.registry,
        )
        self.first_token = Histogram(
            "dspy_trio_time_to_first_token_seconds",
            "Stream start to a field's first delta.",
            [*labels, "field"],
            buckets=_SECONDS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "dspy_trio_tokens", "LM tokens used.", [*labels, "direction"], registry=self.registry
        )
        self._by_program: dict[tuple[str, str], _Children] = {}
        self.registry.register(_EngineCollector(statistics))

    def _children(self, program: str, model: str) -> _Children:
        key = (program, model)
        children = self._by_program.get(key)
        if children is None:
            children = self._by_program[key] = _Children(
                requests={},
                errors={},
                queue_wait=self.queue_wait.labels(program, model),
                lm_latency=self.lm_latency.labels(program, model),
                total_latency=self.total_latency.labels(program, model),
                overhead=self.overhead.labels(program, model),
                tokens_in=self.tokens.labels(program, model, "in"),
                tokens_out=self.tokens.labels(program, model, "out"),
            )
        return children

    def record(
        self,
        program: str,
        model: str,
        outcome: str,
        error_code: str | None,
        timings: Timings | None,
        usage: Usage | None,
    ) -> None:
        """Count one ended request (and observe its timings, when it ran). The label children of a
        (program, model) are built once and kept."""
        children = self._children(program, model)
        counter = children.requests.get(outcome)
        if counter is None:
            counter = children.requests[outcome] = self.requests.labels(program, model, outcome)
        counter.inc()
        if error_code is not None:
            errors = children.errors.get(error_code)
            if errors is None:
                errors = children.errors[error_code] = self.errors.labels(program, model, error_code)
            errors.inc()
        if timings is not None:
            children.queue_wait.observe(timings.queued)
            children.lm_latency.observe(timings.lm)
            children.total_latency.observe(timings.total)
            children.overhead.observe(timings.overhead)
        if usage is not None:
            children.tokens_in.inc(usage.prompt_tokens)
            children.tokens_out.inc(usage.completion_tokens)

    def record_first_token(self, program: str, model: str, field: str, seconds: float) -> None:
        self.first_token.labels(program, model, field).observe(seconds)


@attrs.define
class _Children:
    """The label children of one (program, model): ``.labels(...)`` is a lock and a dict lookup per call."""

    requests: dict[str, Counter]
    errors: dict[str, Counter]
    queue_wait: Histogram
    lm_latency: Histogram
    total_latency: Histogram
    overhead: Histogram
    tokens_in: Counter
    tokens_out: Counter


class _EngineCollector(Collector):
    """Gauges and counters read from the engine's statistics at scrape time."""

    def __init__(self, statistics: Callable[[], EngineStatistics]) -> None:
        self._statistics = statistics

    def describe(self) -> Iterator[Any]:
        return iter(())  # values exist only at scrape time

    def collect(self) -> Iterator[Any]:
        s = self._statistics()
        yield GaugeMetricFamily("dspy_trio_in_flight", "Requests holding a slot.", value=s.in_flight)
        yield GaugeMetricFamily("dspy_trio_queued", "Requests waiting for a slot.", value=s.queued)
        yield GaugeMetricFamily("dspy_trio_max_in_flight", "The in-flight limit.", value=s.max_in_flight)
        yield GaugeMetricFamily("dspy_trio_max_queued", "The admission queue bound.", value=s.max_queued)
        deltas = CounterMetricFamily(
            "dspy_trio_stream_deltas", "Stream deltas dropped or coalesced.", labels=["fate"]
        )
        deltas.add_metric(["dropped"], s.stream_deltas_dropped)
        deltas.add_metric(["coalesced"], s.stream_deltas_coalesced)
        yield deltas
        retries = CounterMetricFamily(
            "dspy_trio_retries", "LM call retries by cause.", labels=["upstream", "cause"]
        )
        waits = CounterMetricFamily(
            "dspy_trio_rate_limit_wait_seconds", "Time spent waiting for rate limits.", labels=["upstream"]
        )
        limits = GaugeMetricFamily(
            "dspy_trio_concurrency_limit", "Adaptive concurrency limit.", labels=["upstream"]
        )
        cooldown = GaugeMetricFamily(
            "dspy_trio_cooldown_seconds", "Time left in a 429 cool-down.", labels=["upstream"]
        )
        for name, upstream in sorted(s.upstreams.items()):
            for cause, count in sorted(upstream.retries_by_cause.items()):
                retries.add_metric([name, cause], count)
            waits.add_metric([name], upstream.rate_limit_wait_seconds)
            cooldown.add_metric([name], upstream.cooldown_remaining)
            if upstream.concurrency_limit is not None:
                limits.add_metric([name], upstream.concurrency_limit)
        yield from (retries, waits, limits, cooldown)
        breakers = GaugeMetricFamily(
            "dspy_trio_breaker_state",
            "Circuit breaker state per LM: 0 closed, 1 half-open, 2 open.",
            labels=["lm"],
        )
        for name, breaker in sorted(s.breakers.items()):
            breakers.add_metric([name], STATE_VALUES[breaker.state])
        fallbacks = CounterMetricFamily(
            "dspy_trio_fallbacks", "LM calls that fell back to the next LM.", labels=["from", "to", "reason"]
        )
        for (source, target, reason), count in sorted(s.fallbacks.items()):
            fallbacks.add_metric([source, target, reason], count)
        yield from (breakers, fallbacks)
        yield CounterMetricFamily(
            "dspy_trio_deadline_refusals",
            "Requests refused because the expected wait for a slot passed their deadline.",
            value=s.deadline_refusals,
        )
        requests = CounterMetricFamily(
            "dspy_trio_tenant_requests", "Requests by tenant and outcome.", labels=["tenant", "outcome"]
        )
        tokens = CounterMetricFamily(
            "dspy_trio_tenant_tokens", "LM tokens used, by tenant.", labels=["tenant", "direction"]
        )
        cost = CounterMetricFamily(
            "dspy_trio_cost_usd", "What requests cost (usage x the LM's price), by tenant.", labels=["tenant"]
        )
        in_flight = GaugeMetricFamily(
            "dspy_trio_tenant_in_flight", "Requests holding a slot, by tenant.", labels=["tenant"]
        )
        queued = GaugeMetricFamily(
            "dspy_trio_tenant_queued", "Requests waiting for a slot, by tenant.", labels=["tenant"]
        )
        for name, tenant in sorted(s.tenants.items()):
            for outcome, count in sorted(tenant.requests.items()):
                requests.add_metric([name, outcome], count)
            tokens.add_metric([name, "in"], tenant.prompt_tokens)
            tokens.add_metric([name, "out"], tenant.completion_tokens)
            cost.add_metric([name], tenant.cost_usd)
            in_flight.add_metric([name], tenant.in_flight)
            queued.add_metric([name], tenant.queued)
        yield from (requests, tokens, cost, in_flight, queued)
