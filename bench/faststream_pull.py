"""Why a durable consumer's FastStream subscriber is fed by the bus's standing pull (bench/PROFILE.md).

One nats-server, one process, the same FastStream subscriber (a pydantic-typed handler with the house's
settling middleware) fed three ways, measured in the same run:
- `faststream-pull`: FastStream's own `PullSub` (one message per handler call, `batch_size` per fetch);
- `faststream-batch`: FastStream's own `PullSub(batch=True)` (the tracker's and projector's shape);
- `standing-pull`: the bus's standing pull handing messages to the subscriber's `consume` (what runs).
Two figures each: throughput over a backlog of `--messages` events, and the latency of a lone event
(published every 20 ms on an otherwise idle consumer: the API's projector on a quiet system).

    python -m bench.faststream_pull [--messages 20000] [--lone 100]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from faststream.middlewares import AckPolicy
from faststream.nats import JStream, NatsRouter, PullSub

from visionyard.shared import streams
from visionyard.shared.bus import Bus
from visionyard.shared.bus.broker import Batch, consumer, service_broker, settling
from visionyard.shared.events import ProgressReported
from visionyard.shared.natsserver import NatsServer

SPEC = streams.API_PROJECTOR
FETCH_TIMEOUT = 5.0  # FastStream's default fetch timeout


def event(seq: int, job_id: str) -> ProgressReported:
    return ProgressReported(job_id=job_id, attempt=1, seq=seq, epoch=seq, total_epochs=1)


async def measure(mode: str, url: str, *, messages: int, lone: int) -> dict[str, float]:
    publisher = await Bus.connect(url, service="bench-publisher")
    await publisher.ensure_topology()
    await publisher.js.purge_stream(streams.EVENTS.name)
    await publisher.js.delete_consumer(SPEC.stream, SPEC.durable)
    await publisher.ensure_topology()
    broker = service_broker(url, service="bench")
    received: list[float] = []
    sent_at: dict[int, float] = {}
    latencies: list[float] = []
    done = asyncio.Event()
    target = [messages]

    def note(seq: int) -> None:
        now = time.perf_counter()
        received.append(now)
        if seq in sent_at:
            latencies.append(now - sent_at[seq])
        if len(received) >= target[0]:
            done.set()

    direct = None
    if mode == "bus-pull-batch":
        async def direct(messages: list[Any]) -> None:  # the standing pull with no FastStream between
            for msg in messages:
                note(ProgressReported.model_validate_json(msg.data).seq)
                await msg.ack()
    elif mode == "standing-pull-batch":
        @consumer(broker, SPEC, batch=500, batched=True)
        async def on_batch(batch: Batch) -> None:
            for msg in batch.raw_message:
                note(ProgressReported.model_validate_json(msg.data).seq)
                await msg.ack()
    elif mode == "standing-pull":
        @consumer(broker, SPEC, batch=500)
        async def on_one(progress: ProgressReported) -> None:
            note(progress.seq)
    else:
        batched = mode == "faststream-batch"
        router = NatsRouter(middlewares=[settling(broker, SPEC)])
        broker.include_router(router)

        async def on_message(progress: ProgressReported) -> None:
            note(progress.seq)

        async def on_messages(batch: Batch) -> None:
            for msg in batch.raw_message:
                note(ProgressReported.model_validate_json(msg.data).seq)
                await msg.ack()

        router.subscriber(
            SPEC.filter_subjects[0], stream=JStream(SPEC.stream, declare=False), durable=SPEC.durable,
            pull_sub=PullSub(batch_size=500, batch=batched, timeout=FETCH_TIMEOUT if not batched else 0.5),
            ack_policy=AckPolicy.MANUAL,
        )(on_messages if batched else on_message)

    for seq in range(messages):
        await publisher.js.publish_async(event(seq, "backlog").subject(), event(seq, "backlog").to_bytes())
    await publisher.nc.flush()
    bus = await Bus.from_broker(broker)
    halt = asyncio.Event()
    started = time.perf_counter()
    if direct is not None:
        pulling = asyncio.create_task(bus.pull_loop(SPEC, direct, stop=halt, batch=500))
    await broker.start()
    await asyncio.wait_for(done.wait(), 300)
    throughput = messages / (received[-1] - started)

    received.clear()
    done.clear()
    target[0] = lone
    for seq in range(messages, messages + lone):
        sent_at[seq] = time.perf_counter()
        await publisher.js.publish(event(seq, "lone").subject(), event(seq, "lone").to_bytes())
        await asyncio.sleep(0.02)  # pacing the trickle (a quiet system), not waiting for readiness
    await asyncio.wait_for(done.wait(), 300)
    halt.set()
    if direct is not None:
        await pulling
    await broker.stop()
    await publisher.close()
    ordered = sorted(latencies)
    return {
        "throughput": throughput,
        "lone_p50_ms": statistics.median(ordered) * 1000,
        "lone_p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000,
    }


async def main(messages: int, lone: int) -> None:
    with tempfile.TemporaryDirectory() as store:
        server = NatsServer(store_dir=Path(store)).start()
        try:
            results: dict[str, dict[str, Any]] = {}
            for mode in ("faststream-pull", "standing-pull", "faststream-batch", "standing-pull-batch", "bus-pull-batch"):
                results[mode] = await measure(mode, server.url, messages=messages, lone=lone)
                figures = results[mode]
                print(f"{mode:20s} {figures['throughput']:9.0f} msg/s   lone event p50 "
                      f"{figures['lone_p50_ms']:7.1f} ms  p99 {figures['lone_p99_ms']:7.1f} ms", flush=True)
        finally:
            server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--lone", type=int, default=100)
    arguments = parser.parse_args()
    asyncio.run(main(arguments.messages, arguments.lone))
