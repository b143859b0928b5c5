"""Prometheus metrics every service shares: its consumers' backlog and its handlers' latency.

The backlog (pending, ack-pending, redelivered) is JetStream's own count, asked for at scrape time, so
the hot path pays nothing for it; handler latency is one histogram observation per handler call (one
message, or one batch for batch handlers). Services add their own metrics (MLflow and S3 call latency,
jobs by state) to the same default registry, which also carries the process collectors.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from visionyard.shared.streams import ConsumerSpec

if TYPE_CHECKING:
    from visionyard.shared.bus.core import BusCore as Bus

log = logging.getLogger("visionyard.metrics")

# Handler calls last from ~100 µs (a projected batch) to minutes (a dataset ingest).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   300.0, float("inf"))

HANDLER_SECONDS = Histogram(
    "visionyard_handler_seconds", "Time a consumer's handler took per call (one message, or one batch)",
    ["consumer"], buckets=LATENCY_BUCKETS,
)
HANDLER_FAILURES = Counter(
    "visionyard_handler_failures_total", "Messages whose handling failed, by the ack decision taken",
    ["consumer", "decision"],
)
# How long a scrape waits for JetStream before leaving a consumer's backlog out of that scrape.
CONSUMER_INFO_TIMEOUT = 5.0


class ConsumerBacklog(Collector):
    """JetStream's counts for every consumer this process consumes from, asked for at scrape time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tracked: dict[str, tuple[Bus, ConsumerSpec, asyncio.AbstractEventLoop]] = {}

    def track(self, bus: Bus, spec: ConsumerSpec) -> None:
        """Report `spec`'s backlog, asking through `bus` on the running loop (call from that loop)."""
        with self._lock:
            self._tracked[spec.durable] = (bus, spec, asyncio.get_running_loop())

    def untrack(self, bus: Bus, spec: ConsumerSpec) -> None:
        """Stop reporting `spec` through `bus` (its standing pull ended)."""
        with self._lock:
            if self._tracked.get(spec.durable, (None,))[0] is bus:
                del self._tracked[spec.durable]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """One gauge per count, labelled by consumer (the same for every replica: it is the server's)."""
        pending = GaugeMetricFamily("visionyard_consumer_pending",
                                    "Messages in the stream not yet delivered to the consumer", labels=["consumer"])
        ack_pending = GaugeMetricFamily("visionyard_consumer_ack_pending",
                                        "Messages delivered and not yet acknowledged", labels=["consumer"])
        redelivered = GaugeMetricFamily("visionyard_consumer_redelivered",
                                        "Unacknowledged messages delivered more than once", labels=["consumer"])
        with self._lock:
            tracked = list(self._tracked.items())
        for durable, (bus, spec, loop) in tracked:
            info = _consumer_info(bus, spec, loop)
            if info is None:
                continue
            pending.add_metric([durable], info.num_pending or 0)
            ack_pending.add_metric([durable], info.num_ack_pending or 0)
            redelivered.add_metric([durable], info.num_redelivered or 0)
        yield pending
        yield ack_pending
        yield redelivered


def _consumer_info(bus: Bus, spec: ConsumerSpec, loop: asyncio.AbstractEventLoop) -> Any:
    if loop.is_closed():
        return None
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        # Blocking the loop on a request that needs the loop would deadlock: expose from a thread.
        log.warning("consumer backlog asked for on its own event loop; scrape from another thread")
        return None
    future = asyncio.run_coroutine_threadsafe(bus.js.consumer_info(spec.stream, spec.durable), loop)
    try:
        return future.result(timeout=CONSUMER_INFO_TIMEOUT)
    except Exception as error:  # the broker is away: this scrape goes without the backlog
        future.cancel()
        log.debug("no consumer info for %s: %s", spec.durable, error)
        return None


CONSUMERS = ConsumerBacklog()
REGISTRY.register(CONSUMERS)


class MetricsServer:
    """The `/metrics` HTTP endpoint of a service (prometheus-client's own server, on its own thread)."""

    def __init__(self, *, host: str, port: int) -> None:
        self._server, self._thread = start_http_server(port, addr=host, registry=REGISTRY)
        self.port = self._server.server_port

    def stop(self) -> None:
        """Stop serving and free the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_metrics(*, host: str, port: int | None) -> MetricsServer | None:
    """Serve `/metrics` on `host:port` when a port is configured (0 picks a free one)."""
    if port is None:
        return None
    server = MetricsServer(host=host, port=port)
    log.info("metrics on http://%s:%d/metrics", host, server.port)
    return server
