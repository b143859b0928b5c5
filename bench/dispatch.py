"""Dispatch: `POST .../start` returned-from-client-send → the trainer process running its first statement.

Excludes the trainer's own imports (the synthetic trainer stamps `t_spawned` before importing anything)
but includes everything the platform does: the API transaction and outbox, the relay's publish, the
runner's pull, the dataset cache check, the job file and the spawn. Jobs run one after another on an
idle stack, after a warm-up job has staged the dataset.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import nats

from bench.harness import BenchStack, percentile, row, synthetic_config, tiny_imagefolder_zip
from visionyard.shared import subjects

GOAL_P50_MS = 100.0


def interpreter_start_ms() -> float:
    """Median wall time of `python -c pass` with this interpreter: the floor of any spawn."""
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


async def dispatch_latencies(bench: BenchStack, dataset_id: str, *, jobs: int) -> list[float]:
    """Seconds from the start request to the trainer's first statement, for `jobs` sequential jobs."""
    nc = await nats.connect(bench.nats_url)
    spawned: dict[str, float] = {}
    arrived = asyncio.Event()

    async def on_progress(msg: nats.aio.msg.Msg) -> None:
        event = json.loads(msg.data)
        spawned[event["job_id"]] = event["metrics"]["t_spawned"]
        arrived.set()

    await nc.subscribe(subjects.job_event("*", "progress"), cb=on_progress)
    latencies = []
    try:
        for _ in range(jobs):
            job_id = bench.create_job(synthetic_config(dataset_id, events=1))
            requested = time.time()
            await asyncio.to_thread(bench.start_job, job_id)
            deadline = time.monotonic() + 60
            while job_id not in spawned:
                arrived.clear()
                await asyncio.wait_for(arrived.wait(), timeout=max(0.1, deadline - time.monotonic()))
            latencies.append(spawned[job_id] - requested)
            await asyncio.to_thread(bench.wait_jobs, [job_id])
    finally:
        await nc.close()
    return latencies


async def run(scratch: Path, *, quick: bool, runs: int) -> str:
    """Measure `runs` series of sequential dispatches; the report section."""
    jobs = 5 if quick else 20
    series: list[list[float]] = []
    with BenchStack(scratch / "dispatch", runners=1, slots=2) as bench:
        dataset_id = bench.upload(tiny_imagefolder_zip(scratch / "tiny.zip"))
        await dispatch_latencies(bench, dataset_id, jobs=1)  # stages the dataset into the runner's cache
        for _ in range(runs):
            series.append(await dispatch_latencies(bench, dataset_id, jobs=jobs))
    p50s = [percentile(values, 0.5) * 1000 for values in series]
    pooled = [value * 1000 for values in series for value in values]
    floor = interpreter_start_ms()
    verdict = "meets" if statistics.median(p50s) <= GOAL_P50_MS else "misses"
    return "\n".join([
        "## Dispatch: start request → trainer process spawned",
        "",
        f"{runs} series of {jobs} jobs started one at a time (synthetic trainer, dataset already cached).",
        "",
        "| figure | ms |",
        "|---|---|",
        row("p50 per series, median (min–max)", f"{statistics.median(p50s):,.1f} ({min(p50s):,.1f}–{max(p50s):,.1f})"),
        row("p90 over every job", f"{percentile(pooled, 0.9):,.1f}"),
        row("max over every job", f"{max(pooled):,.1f}"),
        row("`python -c pass` with the same interpreter (floor of any spawn, for reference)", f"{floor:,.1f}"),
        "",
        f"Goal p50 ≤ {GOAL_P50_MS:.0f} ms: **{verdict}**.",
        "",
    ])
