"""Service metrics on a real nats-server: the consumer backlog as JetStream counts it, scraped over HTTP from a
service's `/metrics` port, and handler latency and failures as a consumer's settling middleware records them."""

from __future__ import annotations

import asyncio
import urllib.request

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from visionyard.shared import streams
from visionyard.shared.bus import Bus, TransientError
from visionyard.shared.bus.broker import Batch, attached, consumer
from visionyard.shared.events import ProgressReported
from visionyard.shared.metrics import CONSUMERS, serve_metrics

pytestmark = pytest.mark.integration


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _progress(seq: int) -> ProgressReported:
    return ProgressReported(job_id="metrics-job", attempt=1, seq=seq, epoch=seq, total_epochs=9, metrics={"loss": 1.0})


async def test_the_metrics_port_serves_the_consumer_backlog_jetstream_counts(bus: Bus) -> None:
    server = serve_metrics(host="127.0.0.1", port=0)
    assert server is not None
    CONSUMERS.track(bus, streams.TRACKER)
    try:
        for seq in (1, 2, 3):
            await bus.publish(_progress(seq))
        # Scraped from another thread, as Prometheus does: the collector asks JetStream through the loop.
        samples = await asyncio.to_thread(_scrape, server.port)
        assert samples[("visionyard_consumer_pending", (("consumer", "tracker"),))] == 3
        assert samples[("visionyard_consumer_ack_pending", (("consumer", "tracker"),))] == 0
        assert ("process_cpu_seconds_total", ()) in samples  # the process collectors come along
    finally:
        CONSUMERS.untrack(bus, streams.TRACKER)
        server.stop()
    # Untracked: a stopped standing pull is no longer reported.
    assert _sample("visionyard_consumer_pending", consumer="tracker") == 0.0


async def test_handler_latency_failures_and_redeliveries_are_counted(bus: Bus) -> None:
    spec = streams.TRACKER
    calls_before = _sample("visionyard_handler_seconds_count", consumer=spec.durable)
    naks_before = _sample("visionyard_handler_failures_total", consumer=spec.durable, decision="nak")
    await bus.publish(_progress(1))
    deliveries: list[int] = []
    redelivered_seen: list[float] = []
    redelivered = asyncio.Event()
    broker = attached(bus, service="test")

    @consumer(broker, spec, batch=10, batched=True)
    async def handler(batch: Batch) -> None:
        deliveries.append(len(batch.raw_message))
        if len(deliveries) == 1:
            raise TransientError("MLflow away")  # nak'ed with backoff, then redelivered
        # The redelivered message is still unacked while its handler runs: JetStream counts it.
        redelivered_seen.append(await asyncio.to_thread(_sample, "visionyard_consumer_redelivered", consumer=spec.durable))
        redelivered.set()

    await broker.start()
    try:
        await asyncio.wait_for(redelivered.wait(), timeout=30)
    finally:
        await broker.stop()  # returns once the handler call in progress and its settling are done
    assert deliveries == [1, 1]
    assert redelivered_seen == [1.0]
    assert _sample("visionyard_handler_seconds_count", consumer=spec.durable) == calls_before + 2
    assert _sample("visionyard_handler_failures_total", consumer=spec.durable, decision="nak") == naks_before + 1
