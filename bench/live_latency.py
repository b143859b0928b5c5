"""Live latency: trainer emit → WebSocket client receive, many clients on one job at a steady event rate,
against a raw core-NATS publish→subscribe hop at the same rate.

The synthetic trainer stamps `t_emit` into each progress event's metrics; every client subtracts it from
its arrival time. Clients subscribe before the job starts (the trainer also waits a warm-up), so no
replay is counted. All clients run in the bench process, on the same machine as the stack.

Each configuration runs per message (the frontend's default: one WebSocket frame per message) and, where
given, in batched mode (`batch_ms`: one JSON-array frame per flush, parsed with one `json.loads`); a
message's latency is then its frame's arrival minus its own `t_emit`.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import nats

from bench.harness import BenchStack, percentile, row, synthetic_config, tiny_imagefolder_zip
from bench.wsclients import Received, watch_job
from visionyard.shared.natsserver import NatsServer

GOAL_P99_MS = 50.0
# The batch interval the batched rows ask for: a fifth of the latency budget.
BATCH_MS = 10


async def raw_hop(scratch: Path, *, rate: int, count: int) -> list[float]:
    """Latencies (s) of core-NATS publish→subscribe at `rate` msg/s."""
    server = NatsServer(store_dir=scratch / "nats-hop").start()
    nc = await nats.connect(server.url)
    latencies: list[float] = []
    done = asyncio.Event()

    async def on_msg(msg: nats.aio.msg.Msg) -> None:
        latencies.append(time.time() - json.loads(msg.data)["t_emit"])
        if len(latencies) >= count:
            done.set()

    try:
        await nc.subscribe("hop", cb=on_msg)
        start = time.perf_counter()
        for index in range(count):
            delay = start + index / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await nc.publish("hop", json.dumps({"t_emit": time.time()}).encode())
        await asyncio.wait_for(done.wait(), timeout=30)
        return latencies
    finally:
        await nc.close()
        server.stop()


async def platform_latency(bench: BenchStack, dataset_id: str, *, clients: int, rate: int, events: int,
                           batch_ms: int | None = None) -> tuple[list[float], int, float]:
    """(latencies of every progress message at every client, clients that failed, delivered msg/s)."""
    job_id = bench.create_job(synthetic_config(dataset_id, events=events, rate=rate, warmup=3.0))
    seen = [Received() for _ in range(clients)]
    ready = [asyncio.Event() for _ in range(clients)]
    tasks = [asyncio.create_task(watch_job(bench.stack.api_url, job_id, expected=events, received=got, ready=flag,
                                           measure_latency=True, timeout=300, batch_ms=batch_ms))
             for got, flag in zip(seen, ready, strict=True)]
    await asyncio.wait_for(asyncio.gather(*(flag.wait() for flag in ready)), timeout=120)
    await asyncio.to_thread(bench.start_job, job_id)
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    failed = sum(1 for outcome in outcomes if isinstance(outcome, BaseException))
    latencies = [value for got in seen for value in got.latencies]
    firsts = [got.first for got in seen if got.first]
    lasts = [got.last for got in seen if got.last]
    delivered = len(latencies) / (max(lasts) - min(firsts)) if firsts and max(lasts) > min(firsts) else 0.0
    return latencies, failed, delivered


def _ms(values: list[float], fraction: float) -> str:
    return f"{percentile(values, fraction) * 1000:,.1f}"


async def run(scratch: Path, *, quick: bool, runs: int) -> str:
    """Measure the raw hop and each (clients, rate) configuration; the report section."""
    # (clients, events/s, events, batch_ms or None for one message per frame)
    configs: list[tuple[int, int, int, int | None]] = (
        [(10, 200, 400, None), (10, 200, 400, BATCH_MS)] if quick
        else [(100, 1_000, 3_000, None), (100, 1_000, 3_000, BATCH_MS), (100, 100, 500, None), (10, 1_000, 3_000, None)]
    )
    lines = [
        "## Live latency: trainer emit → WebSocket client receive",
        "",
        "Synthetic trainer emitting at a fixed rate through runner → JetStream → API → WebSocket; "
        f"latencies pooled over every progress message at every client and {runs} run(s). Goal: p99 ≤ "
        f"{GOAL_P99_MS:.0f} ms at 100 clients and 1,000 events/s.",
        "",
        "| path | clients | events/s | messages | p50 ms | p99 ms | max ms | delivered msg/s | clients dropped |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    hop: list[float] = []
    for index in range(runs):
        hop.extend(await raw_hop(scratch / f"hop-{index}", rate=1_000, count=2_000 if not quick else 400))
    lines.append(row("raw core-NATS pub→sub (baseline)", 1, "1,000", f"{len(hop):,}", _ms(hop, 0.5), _ms(hop, 0.99),
                     f"{max(hop) * 1000:,.1f}", "—", "—"))
    with BenchStack(scratch / "live", runners=1, slots=1) as bench:
        dataset_id = bench.upload(tiny_imagefolder_zip(scratch / "tiny.zip"))
        for clients, rate, events, batch_ms in configs:
            pooled: list[float] = []
            dropped = 0
            rates: list[float] = []
            for _ in range(runs):
                latencies, failed, delivered = await platform_latency(bench, dataset_id, clients=clients,
                                                                      rate=rate, events=events, batch_ms=batch_ms)
                pooled.extend(latencies)
                dropped += failed
                rates.append(delivered)
            path = "platform" if batch_ms is None else f"platform, batched (batch_ms={batch_ms})"
            lines.append(row(path, clients, f"{rate:,}", f"{len(pooled):,}", _ms(pooled, 0.5),
                             _ms(pooled, 0.99), f"{max(pooled, default=0) * 1000:,.1f}",
                             f"{sorted(rates)[len(rates) // 2]:,.0f}", dropped))
    lines.append("")
    return "\n".join(lines)
