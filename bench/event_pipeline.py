"""Event pipeline: progress events/s from synthetic trainers through the runners, JetStream, the API's
projector (into the DB) and out to WebSocket clients — against the same events through a tuned raw
nats-py JetStream pipeline (async publish, standing pull, acks without a round trip) on the same kind of
server, measured alternately with the platform in the same run."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import statistics
import time
from pathlib import Path

import nats
import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import api

from bench.harness import BenchStack, row, spread, synthetic_config, tiny_imagefolder_zip
from bench.wsclients import Received, watch_job
from visionyard.shared.events import ProgressReported
from visionyard.shared.natsserver import NatsServer

GOAL = 5_000.0
# The raw baseline's tuning: PubAcks in flight per producer, messages per standing pull request.
PUBLISH_WINDOW = 1_000
PULL_BATCH = 1_000
RAW_TIMEOUT = 60.0


async def raw_rate(scratch: Path, *, producers: int, events: int) -> float:
    """Baseline: the same events through a tuned nats-py JetStream pipeline, no platform code.

    `producers` connections publish at once, each with up to `PUBLISH_WINDOW` PubAcks in flight
    (`publish_async`), while one consumer keeps pull requests standing for up to `PULL_BATCH`
    messages and acks each without waiting for a reply (one `ack_sync` at the end, which the server
    answers only after every ack sent before it). Rate = events ÷ time from the first publish until
    every PubAck is in and the last ack is confirmed; the consumer is then checked to hold nothing.
    """
    count = producers * events
    server = NatsServer(store_dir=scratch / "nats-raw").start()
    connections = [await nats.connect(server.url, name=f"bench-raw-{index}") for index in range(producers + 1)]
    consumer_nc, producer_ncs = connections[0], connections[1:]
    try:
        js = consumer_nc.jetstream()
        await js.add_stream(api.StreamConfig(name="RAW", subjects=["raw.>"], storage=api.StorageType.FILE))
        await js.add_consumer("RAW", config=api.ConsumerConfig(
            durable_name="raw", ack_policy=api.AckPolicy.EXPLICIT, max_ack_pending=2 * PULL_BATCH))
        # Encoded before the clock starts: the trainers encode their events, not the transport.
        payloads = [[ProgressReported(job_id=f"raw-{producer}", attempt=1, seq=seq, epoch=seq, total_epochs=events,
                                      metrics={"loss": 1.0}).to_bytes() for seq in range(1, events + 1)]
                    for producer in range(producers)]
        consumed = asyncio.create_task(_standing_pull(consumer_nc, "RAW", "raw", count=count))
        start = time.perf_counter()
        await asyncio.gather(*(_publish_windowed(nc, f"raw.{index}", payloads[index], index=index)
                               for index, nc in enumerate(producer_ncs)))
        await consumed
        elapsed = time.perf_counter() - start
        info = await js.consumer_info("RAW", "raw")
        if info.num_pending or info.num_ack_pending:
            raise RuntimeError(f"raw baseline left {info.num_pending} pending, {info.num_ack_pending} unacknowledged")
        return count / elapsed
    finally:
        for nc in connections:
            await nc.close()
        server.stop()


async def _publish_windowed(nc: NATS, subject: str, payloads: list[bytes], *, index: int) -> None:
    """Publish with up to `PUBLISH_WINDOW` PubAcks outstanding, de-duplicated by id as the runners publish."""
    js = nc.jetstream(publish_async_max_pending=PUBLISH_WINDOW)
    futures = [await js.publish_async(subject, payload, headers={"Nats-Msg-Id": f"raw-{index}-{seq}"})
               for seq, payload in enumerate(payloads)]
    await js.publish_async_completed()
    for future in futures:
        future.result()  # a refused publish fails the baseline instead of counting as delivered


async def _standing_pull(nc: NATS, stream: str, durable: str, *, count: int) -> None:
    """Consume `count` messages: pull requests kept standing, each message acked without a round trip.

    A new request for `PULL_BATCH` goes out whenever less than half a batch is still owed, so the
    server always has somewhere to deliver; requests carry no expiry because exactly `count` are asked for.
    """
    received = 0
    requested = 0
    last: Msg | None = None
    done = asyncio.Event()
    inbox = nc.new_inbox()
    next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"

    async def request_more() -> None:
        nonlocal requested
        while requested < count and requested - received < PULL_BATCH // 2:
            batch = min(PULL_BATCH, count - requested)
            await nc.publish(next_subject, orjson.dumps({"batch": batch}), reply=inbox)
            requested += batch

    async def on_message(msg: Msg) -> None:
        nonlocal received, last
        if not msg.reply:  # a status message (no ack subject): nothing delivered
            return
        received += 1
        if received == count:
            last = msg  # acked with a reply at the end
            done.set()
            return
        await msg.ack()
        await request_more()

    subscription = await nc.subscribe(inbox, cb=on_message, pending_msgs_limit=4 * PULL_BATCH)
    try:
        await request_more()
        await asyncio.wait_for(done.wait(), timeout=RAW_TIMEOUT)
        assert last is not None
        # Acks on one connection are applied in order: once the last is confirmed, all were.
        await last.ack_sync(timeout=RAW_TIMEOUT)
    finally:
        await subscription.unsubscribe()


async def platform_rates(bench: BenchStack, dataset_id: str, *, jobs: int, events: int) -> tuple[float, float]:
    """(events/s at the WebSocket clients, events/s projected into the DB) for `jobs` parallel jobs."""
    job_ids = [bench.create_job(synthetic_config(dataset_id, events=events)) for _ in range(jobs)]
    seen = [Received() for _ in job_ids]
    ready = [asyncio.Event() for _ in job_ids]
    clients = [asyncio.create_task(watch_job(bench.stack.api_url, job_id, expected=events, received=got, ready=flag))
               for job_id, got, flag in zip(job_ids, seen, ready, strict=True)]
    await asyncio.gather(*(flag.wait() for flag in ready))
    for job_id in job_ids:
        await asyncio.to_thread(bench.start_job, job_id)
    await asyncio.gather(*clients)
    first = min(got.first for got in seen)
    ws_rate = jobs * events / (max(got.last for got in seen) - first)
    await asyncio.to_thread(_wait_projected, bench.api_db_path, job_ids, events)
    db_rate = jobs * events / (time.time() - first)
    return ws_rate, db_rate


def _wait_projected(db_path: Path, job_ids: list[str], events: int, *, timeout: float = 300.0) -> None:
    """Until every job's row shows its last epoch, read from the API's SQLite file, not through the API.

    Polling `GET /training/jobs/{id}` every 50 ms (4 jobs) cost the API ~3 ms of CPU per request,
    taken from the projector it was timing; a read-only reader of the WAL database costs the API
    nothing and does not block its writer.
    """
    marks = ",".join("?" * len(job_ids))
    query = f"SELECT count(*) FROM training_jobs WHERE id IN ({marks}) AND current_epoch >= ?"
    deadline = time.monotonic() + timeout
    with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)) as db:
        while db.execute(query, [*job_ids, events]).fetchone()[0] < len(job_ids):
            if time.monotonic() > deadline:
                raise TimeoutError(f"jobs not projected after {timeout:.0f}s")
            time.sleep(0.01)


async def run(scratch: Path, *, quick: bool, runs: int) -> str:
    """Measure the raw baseline and the end-to-end pipeline `runs` times, alternating; the report section."""
    jobs, events = (2, 500) if quick else (4, 5_000)
    total = jobs * events
    raw: list[float] = []
    ws: list[float] = []
    db: list[float] = []
    with BenchStack(scratch / "pipeline", runners=2, slots=2) as bench:
        dataset_id = bench.upload(tiny_imagefolder_zip(scratch / "tiny.zip"))
        # One warm-up job per runner slot stages the dataset, so the runs measure the steady state.
        await platform_rates(bench, dataset_id, jobs=jobs, events=10)
        # Each baseline run just before a platform run (the stack idle meanwhile), so both see the
        # same machine load: only ratios from one run mean anything on a shared machine.
        for index in range(runs):
            raw.append(await raw_rate(scratch / f"raw-{index}", producers=jobs, events=events))
            ws_rate, db_rate = await platform_rates(bench, dataset_id, jobs=jobs, events=events)
            ws.append(ws_rate)
            db.append(db_rate)
    ratio = statistics.median(ws) / statistics.median(raw)
    db_ratio = statistics.median(db) / statistics.median(raw)
    verdict = "meets" if statistics.median(ws) >= GOAL and statistics.median(db) >= GOAL else "misses"
    return "\n".join([
        "## Event pipeline: synthetic trainers → runners → JetStream → API (DB + WebSocket)",
        "",
        f"{jobs} jobs in parallel on 2 runners × 2 slots, each trainer emitting {events:,} progress events as fast "
        f"as it can ({total:,} in all); one WebSocket client per job. Rate = events ÷ time from the first "
        "progress message at any client to the last (WebSocket) or until every job row shows the last epoch (DB, read "
        "from the API's SQLite file, so the observer costs the API nothing).",
        "",
        f"Baseline: the same {total:,} events through a tuned nats-py pipeline with no platform code, on its own "
        f"nats-server, run just before each platform run: {jobs} producers (one connection each, as many as the "
        f"platform's trainers) publishing at once with up to {PUBLISH_WINDOW:,} PubAcks in flight each "
        f"(`publish_async`, de-duplicated by `Nats-Msg-Id` as the runners publish), one consumer with pull requests "
        f"for {PULL_BATCH:,} kept standing and every message acked without waiting (one `ack_sync` at the end). "
        "Rate = events ÷ time from the first publish until every PubAck is in and the last ack is confirmed; all in "
        "the bench's one Python process, where the platform spreads the same work over trainers, runners and the API.",
        "",
        "| path | events/s median (min–max) |",
        "|---|---|",
        row("raw nats-py: async publish, standing pull, batched ack (baseline)", spread(raw)),
        row("platform, delivered to WebSocket clients", spread(ws)),
        row("platform, projected into the DB", spread(db)),
        "",
        f"Ratio (pipeline ÷ raw): **{ratio:.2f}** (WebSocket; DB ÷ raw {db_ratio:.2f}). "
        f"Goal ≥ {GOAL:,.0f} events/s: **{verdict}**.",
        "",
    ])
