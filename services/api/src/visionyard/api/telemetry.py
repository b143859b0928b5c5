"""Prometheus metrics of one API instance: requests, latency, outbox backlog, projector lag."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.requests import Request
from starlette.responses import Response


class ApiMetrics:
    """The instance's collectors, in their own registry (several apps may live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "visionyard_api_requests_total", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "visionyard_api_request_seconds", "HTTP request latency", ["method", "route"], registry=self.registry
        )
        self.outbox_backlog = Gauge(
            "visionyard_api_outbox_backlog", "outbox rows waiting to be published", registry=self.registry
        )
        self.outbox_published = Gauge(
            "visionyard_api_outbox_published", "outbox rows published by this instance", registry=self.registry
        )
        self.projector_lag = Gauge(
            "visionyard_api_projector_lag", "events pending for the api-projector consumer", registry=self.registry
        )
        self.projector_applied = Gauge(
            "visionyard_api_projector_applied", "events applied by this instance", registry=self.registry
        )

    async def middleware(self, request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        """Count and time every request by its route template (not its raw path: bounded labels)."""
        started = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            template = getattr(route, "path", "unmatched")
            self.requests.labels(request.method, template, str(status)).inc()
            self.latency.labels(request.method, template).observe(time.perf_counter() - started)

    def exposition(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
