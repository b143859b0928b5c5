"""Prometheus metrics of one API instance: requests, latency, outbox backlog, projector lag, jobs by state,
WebSocket clients; its `/metrics` also carries the process-wide registry (consumer backlog, handler latency)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator

from opentelemetry.trace import SpanKind
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response

from visionyard.shared import tracing


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
        self._job_statuses: set[str] = set()
        self.jobs = Gauge("visionyard_api_jobs", "training jobs by status (the whole platform)", ["status"],
                          registry=self.registry)
        self.websocket_clients = Gauge(
            "visionyard_api_websocket_clients", "WebSocket clients connected to this instance", registry=self.registry
        )
        # Read from the live stats at scrape time: the WebSocket path keeps its plain integer counters.
        self.dropped_slow_clients = 0
        self.registry.register(_DroppedSlowClients(self))

    def set_jobs(self, counts: dict[str, int]) -> None:
        """Jobs by status; a status no job is in any more reads 0 rather than its last count."""
        self._job_statuses.update(counts)
        for status in self._job_statuses:
            self.jobs.labels(status).set(counts.get(status, 0))

    async def middleware(self, request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        """Count and time every request by its route template (not its raw path: bounded labels)."""
        started = time.perf_counter()
        status = 500
        # The request's span (when tracing is on) is the parent of the outbox rows it writes.
        with tracing.span(f"{request.method} {request.url.path}", kind=SpanKind.SERVER) as span:
            try:
                response = await call_next(request)
                status = response.status_code
                return response
            finally:
                route = request.scope.get("route")
                template = getattr(route, "path", "unmatched")
                self.requests.labels(request.method, template, str(status)).inc()
                self.latency.labels(request.method, template).observe(time.perf_counter() - started)
                if span is not None:
                    span.update_name(f"{request.method} {template}")
                    span.set_attribute("http.response.status_code", status)

    def exposition(self) -> bytes:
        """The text exposition format: this instance's collectors, then the process-wide registry.

        Call it off the event loop: the consumer backlog is asked of JetStream through that loop.
        """
        return generate_latest(self.registry) + generate_latest(REGISTRY)


class _DroppedSlowClients(Collector):
    """`visionyard_api_websocket_dropped_slow_clients_total`, from the count `ApiMetrics` was last given."""

    def __init__(self, metrics: ApiMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[CounterMetricFamily]:
        """The counter as of the last scrape's update."""
        yield CounterMetricFamily(
            "visionyard_api_websocket_dropped_slow_clients",
            "WebSocket clients disconnected for not keeping up (they reconnect with last_seq)",
            value=self._metrics.dropped_slow_clients,
        )
