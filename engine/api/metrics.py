"""The API's Prometheus metrics and the middleware that records them (and logs each request).

Labels are small fixed sets: the method, the route template (never the concrete path, which
would carry webhook ids) and the status code.
"""

from __future__ import annotations

import logging
import time

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import CollectorRegistry, Counter, Histogram

from engine.api.validation import WEBHOOK_ID

__all__ = ["ApiMetrics", "metrics_middleware", "route_of"]

log = logging.getLogger("engine.api.access")

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ApiMetrics:
    """Every API metric, in its own registry (one per application, so tests stay apart)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        p = "cargolint_webhooks_api_"
        self.requests = Counter(
            p + "requests_total",
            "API requests answered, by method, route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            p + "request_duration_seconds",
            "Time to answer an API request, by method and route template.",
            ["method", "route"],
            buckets=_BUCKETS,
            registry=self.registry,
        )


def route_of(request: web.Request) -> str:
    """The matched route's template, such as `/api/v1/webhooks/{id}`, or `unmatched`."""
    info = request.match_info
    if info.http_exception is not None:
        return "unmatched"
    resource = info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def _webhook_id(request: web.Request) -> str | None:
    # Only a well-formed id is logged: a path segment is the client's text, not ours.
    value = request.match_info.get("id")
    return value if value is not None and WEBHOOK_ID.fullmatch(value) else None


def metrics_middleware(metrics: ApiMetrics) -> Middleware:
    """Count and time every request; runs outermost, so it sees the final status."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            status = exc.status
            raise
        else:
            status = response.status
            return response
        finally:
            elapsed = time.perf_counter() - started
            method = request.method if request.method in _METHODS else "other"
            route = route_of(request)
            metrics.requests.labels(method, route, str(status)).inc()
            metrics.duration.labels(method, route).observe(elapsed)
            log.info(
                "request",
                extra={
                    "method": method,
                    "route": route,
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 1),
                    "webhook_id": _webhook_id(request),
                },
            )

    return middleware
