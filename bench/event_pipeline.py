"""Event pipeline overhead: the shared bus (publish with PubAck, durable pull consumer with explicit
acks and the ack decision) against raw nats-py JetStream publish+pull+ack on the same server."""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

from nats.js import api

from visionyard.shared import streams
from visionyard.shared.bus import Bus
from visionyard.shared.events import ProgressReported
from visionyard.shared.natsserver import NatsServer


async def _raw(bus: Bus, count: int) -> float:
    """Baseline: pipelined JetStream publishes, then fetch(100)+ack on a fresh consumer."""
    await bus.js.add_stream(api.StreamConfig(name="RAW", subjects=["raw.>"], storage=api.StorageType.FILE))
    payload = ProgressReported(job_id="raw", attempt=1, seq=1, epoch=1, total_epochs=1, metrics={"loss": 1.0}).to_bytes()
    start = time.perf_counter()
    acks = [bus.js.publish(f"raw.{i % 10}", payload) for i in range(count)]
    await asyncio.gather(*acks)
    sub = await bus.js.pull_subscribe("raw.>", durable="raw", stream="RAW")
    received = 0
    while received < count:
        msgs = await sub.fetch(100, timeout=5)
        await asyncio.gather(*(m.ack() for m in msgs))
        received += len(msgs)
    elapsed = time.perf_counter() - start
    await bus.js.delete_stream("RAW")
    return count / elapsed


async def _platform(bus: Bus, count: int) -> float:
    """Platform path: `Bus.publish` (message id, PubAck) and `Bus.consume_batches` (explicit acks)."""
    start = time.perf_counter()
    events = [
        ProgressReported(job_id=f"job{i % 10}", attempt=1, seq=i + 1, epoch=1, total_epochs=1, metrics={"loss": 1.0})
        for i in range(count)
    ]
    await asyncio.gather(*(bus.publish(event) for event in events))
    done = asyncio.Event()
    seen = 0

    async def handle(batch: list) -> None:  # type: ignore[type-arg]
        nonlocal seen
        seen += len(batch)
        await asyncio.gather(*(m.ack() for m in batch))
        if seen >= count:
            done.set()

    consumer = asyncio.create_task(bus.consume_batches(streams.TRACKER, handle, stop=done, batch=500))
    await done.wait()
    elapsed = time.perf_counter() - start
    await consumer
    return count / elapsed


async def run(scratch: Path, *, quick: bool, runs: int) -> str:
    """Measure both rates `runs` times each on one fresh server; return the report section."""
    count = 2_000 if quick else 20_000
    raw_rates: list[float] = []
    platform_rates: list[float] = []
    for index in range(runs):
        server = NatsServer(store_dir=scratch / f"nats-{index}").start()
        bus = await Bus.connect(server.url, service="bench")
        try:
            await bus.ensure_topology()
            raw_rates.append(await _raw(bus, count))
            platform_rates.append(await _platform(bus, count))
        finally:
            await bus.close()
            server.stop()
    ratio = statistics.median(platform_rates) / statistics.median(raw_rates)
    return "\n".join(
        [
            "## Event pipeline: bus publish + durable consume vs raw nats-py",
            "",
            f"{count} progress events, publishes pipelined, consumer fetching batches.",
            "",
            "| path | events/s median | min | max |",
            "|---|---|---|---|",
            f"| raw nats-py (baseline) | {statistics.median(raw_rates):,.0f} | {min(raw_rates):,.0f} | {max(raw_rates):,.0f} |",
            f"| Visionyard bus | {statistics.median(platform_rates):,.0f} | {min(platform_rates):,.0f} | {max(platform_rates):,.0f} |",
            "",
            f"Ratio (bus ÷ raw): **{ratio:.2f}**. Goal of the end-to-end pipeline (runner → API → WebSocket): ≥ 5,000 events/s.",
            "",
        ]
    )
