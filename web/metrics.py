"""``/metrics``: the engine's statistics as Prometheus text (prometheus-client), and as a few JSON fields;
and the web layer's own count of answers by route and status."""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

from dspy_trio.engine import Engine, EngineStatistics, SharingStatistics


def metrics_text(engine: Engine) -> tuple[bytes, str]:
    """The engine's Prometheus registry in text exposition format, and its content type."""
    return generate_latest(engine.metrics.registry), CONTENT_TYPE_LATEST


def metrics_json(stats: EngineStatistics) -> dict[str, Any]:
    """The plain fields (requests, errors, latency), plus the engine's own counters, and per tenant (by
    name, never key) its weight, requests in flight and queued, outcomes, tokens and cost in USD."""
    errors = stats.failed + stats.timed_out
    ended = stats.ended
    return {
        "total_requests": stats.requests_total,
        "active_requests": stats.in_flight + stats.queued,
        "total_errors": errors,
        "total_timeouts": stats.timed_out,
        "average_duration_ms": round(stats.seconds_total / ended * 1000, 3) if ended else 0.0,
        "error_rate": round(errors / ended, 6) if ended else 0.0,
        "succeeded": stats.succeeded,
        "cancelled": stats.cancelled,
        "abandoned": stats.abandoned,
        "shut_down": stats.shut_down,
        "rejected": stats.rejected,
        "invalid": stats.invalid,
        "queued": stats.queued,
        "in_flight": stats.in_flight,
        "errors_by_code": dict(stats.errors_by_code),
        "deadline_refusals": stats.deadline_refusals,
        "tenants": {
            name: {
                "weight": tenant.weight,
                "in_flight": tenant.in_flight,
                "queued": tenant.queued,
                "requests": dict(tenant.requests),
                "prompt_tokens": tenant.prompt_tokens,
                "completion_tokens": tenant.completion_tokens,
                "cost_usd": round(tenant.cost_usd, 9),
            }
            for name, tenant in sorted(stats.tenants.items())
        },
        **({"cache": _cache_json(stats.sharing)} if stats.sharing is not None else {}),
    }


def _cache_json(sharing: SharingStatistics) -> dict[str, int]:
    """Single-flight and the response cache: the counters of ``dspy_trio_cache_*`` and
    ``dspy_trio_coalesced_*``."""
    return {
        "hits": sharing.cache_hits,
        "misses": sharing.cache_misses,
        "bypasses": sharing.cache_bypasses,
        "coalesced_waiters": sharing.coalesced,
        "upstream_calls_saved": sharing.upstream_calls_saved,
        "tokens_saved": sharing.tokens_saved,
        "shared_calls_in_flight": sharing.in_flight,
        "entries": sharing.cache_entries,
        "bytes": sharing.cache_bytes,
        "evictions": sharing.cache_evictions,
        "corrupt_entries": sharing.corrupt_entries,
        "takeovers": sharing.takeovers,
        "redis_fallbacks": sharing.redis_fallbacks,
    }


class HTTPMetrics:
    """Answers by route (its handler's name: ``chat_completions``, ``program_predict``, ...; ``unmatched``
    for a path no route has) and status: ``dspy_trio_http_responses_total``. The front door counts every
    answer as it starts, its own refusals included; the service registers the counter in the engine's
    registry when the engine opens, so ``/metrics`` (and a worker's snapshot) carries it."""

    def __init__(self) -> None:
        self.responses = Counter(
            "dspy_trio_http_responses",
            "HTTP answers (and WebSocket handshakes) by route and status.",
            ["route", "status"],
            registry=None,
        )
        self._children: dict[tuple[str, int], Any] = {}

    def count(self, route: str, status: int) -> None:
        """Count one answer. Does not block."""
        child = self._children.get((route, status))
        if child is None:
            child = self._children[(route, status)] = self.responses.labels(route, str(status))
        child.inc()

    def register(self, registry: CollectorRegistry) -> None:
        registry.register(self.responses)
