"""Operations: the playground, liveness, readiness, metrics, the caller's tenant, and cancelling a request
by its id."""

from __future__ import annotations

from quart import Response, current_app, request

from dspy_trio.engine import TenantConfig
from dspy_trio.engine._tenants import DEFAULT_TENANT

from .call import Call
from .errors import HTTPError
from .http import json_response
from .metrics import metrics_json, metrics_text
from .service import Service, not_ready
from .workers import instance_metrics_json, instance_metrics_text, workers_dir


async def playground(service: Service, call: Call) -> Response:
    """The browser playground (static files shipped in the package)."""
    return await current_app.send_static_file("index.html")


async def health(service: Service, call: Call) -> Response:
    """Liveness: the process answers."""
    return Response("OK", mimetype="text/plain")


async def ready(service: Service, call: Call) -> Response:
    """Readiness: 503 while starting or draining. The state of each LM's circuit breaker (``breakers``:
    ``closed``, ``open``, ``half_open``; an open one does not make the process unready: its calls fall
    back or fail fast). With a cluster (Redis), also how many processes share the upstream quota and
    whether this one has fallen back to its local share (``degraded``)."""
    if service.ready:
        body: dict[str, object] = {"status": "ready"}
        if service.engine is not None:
            if breakers := service.engine.statistics().breakers:
                body["breakers"] = {name: breaker.state for name, breaker in sorted(breakers.items())}
            if service.engine.cluster is not None:
                cluster = service.engine.cluster.statistics()
                body["cluster"] = {"processes": cluster.processes, "degraded": cluster.degraded}
        return json_response(body)
    raise not_ready()


async def cancel_request(service: Service, call: Call, request_id: str) -> Response:
    """Cancel an in-flight request by the id the server gave it (``request_id`` in bodies, the
    ``X-Server-Request-ID`` header). Only the API key that started it may; for any other caller the id
    does not exist (404), so ids cannot be probed. With a cluster (Redis), a request running in another
    worker or replica is cancelled there, under the same rule (the engine's,
    :mod:`dspy_trio.engine._owners`)."""
    engine = service.engine_even_draining()  # an owner may still cancel while the server drains
    found = await engine.cancel_anywhere(request_id, owner=call.owner)
    if not found:
        raise HTTPError(
            404, f"no request {request_id!r} is in flight", type="not_found_error", code="unknown_request"
        )
    return json_response({"cancelled": request_id})


async def tenant(service: Service, call: Call) -> Response:
    """The caller's tenant (the one of its API key; ``default`` without keys): its name (never a key),
    weight, own limits and budget, and what it has used in this process."""
    engine = service.require_engine()
    name = call.tenant or DEFAULT_TENANT
    config = service.settings.engine.tenants.get(name, TenantConfig())
    usage = engine.tenant_statistics(name)
    budget = config.budget
    return json_response(
        {
            "tenant": name,
            "weight": config.weight,
            "max_in_flight": config.max_in_flight,
            "max_queued": config.max_queued,
            "rate_limit": {"rpm": config.rate_limit.rpm, "tpm": config.rate_limit.tpm},
            "budget": None if budget is None else {"usd": budget.usd, "window": budget.window},
            "usage": None
            if usage is None
            else {
                "in_flight": usage.in_flight,
                "queued": usage.queued,
                "requests": dict(usage.requests),
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
                "cost_usd": round(usage.cost_usd, 9),
            },
        }
    )


async def metrics(service: Service, call: Call) -> Response:
    """Prometheus text, or a few JSON fields with ``Accept: application/json``."""
    engine = service.engine_even_draining()  # the last counts of a stopping process stay readable
    directory = workers_dir()  # several workers: the whole instance
    if request.accept_mimetypes.best_match(["text/plain", "application/json"]) == "application/json":
        if directory is not None:
            return json_response(instance_metrics_json(directory, engine))
        return json_response(metrics_json(engine.statistics()))
    if directory is not None:
        body, content_type = instance_metrics_text(directory, engine)
    else:
        body, content_type = metrics_text(engine)
    return Response(body, content_type=content_type)
