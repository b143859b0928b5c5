"""Scale: 1,000 queued synthetic jobs drained by 4 runners — jobs/s dispatched, and the API's memory.

The runners are stopped while the jobs are queued through REST (so the queue really is 1,000 deep),
then started again; "dispatched" is a runner publishing `started` for a job (its trainer spawned).
The rate is counted from the first `started` to the last. The API's RSS is read before queuing, after
queuing and after every job has completed.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

import httpx
import nats

from bench.harness import BenchStack, row, rss_mb, spread, synthetic_config, tiny_imagefolder_zip
from visionyard.cli.stack import _stop_group
from visionyard.shared import subjects

GOAL_JOBS_PER_S = 50.0
RUNNERS = 4


async def queue_jobs(api_url: str, dataset_id: str, *, count: int, concurrency: int = 8) -> float:
    """Create and start `count` jobs through REST with `concurrency` clients; jobs queued per second."""
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=api_url, timeout=60) as http:

        async def one() -> None:
            async with limit:
                created = await http.post("/api/v1/training/jobs", json={"config": synthetic_config(dataset_id, events=1)})
                created.raise_for_status()
                started = await http.post(f"/api/v1/training/jobs/{created.json()['id']}/start")
                started.raise_for_status()

        start = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(count)))
        return count / (time.perf_counter() - start)


async def scale_once(bench: BenchStack, dataset_id: str, *, jobs: int) -> dict[str, float]:
    """One drain of `jobs` queued jobs; rates and RSS figures."""
    api_pid = bench.pid_of("api")
    for service in [s for s in bench.stack.services if s.name.startswith("runner")]:
        _stop_group(service.process, timeout=20)
        bench.stack.services.remove(service)
    rss_before = rss_mb(api_pid)
    queued_rate = await queue_jobs(bench.stack.api_url, dataset_id, count=jobs)
    rss_queued = rss_mb(api_pid)
    nc = await nats.connect(bench.nats_url)
    started: list[float] = []
    completed: list[float] = []
    finished = asyncio.Event()

    async def on_started(msg: nats.aio.msg.Msg) -> None:
        started.append(time.perf_counter())

    async def on_completed(msg: nats.aio.msg.Msg) -> None:
        completed.append(time.perf_counter())
        if len(completed) >= jobs:
            finished.set()

    await nc.subscribe(subjects.job_event("*", "started"), cb=on_started)
    await nc.subscribe(subjects.job_event("*", "completed"), cb=on_completed)
    try:
        for index in range(1, RUNNERS + 1):
            bench.stack._spawn("runner", label=f"runner-{index}", index=index)
        await asyncio.wait_for(finished.wait(), timeout=900)
    finally:
        await nc.close()
    # Wait for the projector to catch up, so "after" means after all the work.
    await asyncio.to_thread(_wait_projected, bench, jobs)
    return {
        "queued_per_s": queued_rate,
        "dispatched_per_s": (len(started) - 1) / (max(started) - min(started)),
        "completed_per_s": jobs / (max(completed) - min(started)),
        "rss_before": rss_before,
        "rss_queued": rss_queued,
        "rss_after": rss_mb(api_pid),
    }


def _wait_projected(bench: BenchStack, jobs: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = bench.client.request("GET", "/api/v1/training/jobs", params={"status": "completed", "limit": 1})
        total = listed.get("total") if isinstance(listed, dict) else None
        if total is None or total >= jobs:
            return
        time.sleep(0.5)


async def run(scratch: Path, *, quick: bool, runs: int) -> str:
    """Drain `runs` queues of synthetic jobs with 4 runners; the report section."""
    jobs = 100 if quick else 1_000
    results = []
    with BenchStack(scratch / "scale", runners=RUNNERS, slots=4) as bench:
        dataset_id = bench.upload(tiny_imagefolder_zip(scratch / "tiny.zip"))
        for _ in range(runs):
            results.append(await scale_once(bench, dataset_id, jobs=jobs))
    dispatched = [r["dispatched_per_s"] for r in results]
    verdict = "meets" if statistics.median(dispatched) >= GOAL_JOBS_PER_S else "misses"
    return "\n".join([
        f"## Scale: {jobs:,} queued synthetic jobs, {RUNNERS} runners × 4 slots",
        "",
        "| figure | median (min–max) |",
        "|---|---|",
        row("jobs queued per second through REST (create + start, 8 concurrent clients)",
            spread([r["queued_per_s"] for r in results], "{:,.1f}")),
        row("jobs dispatched per second (runner spawned the trainer)", spread(dispatched, "{:,.1f}")),
        row("jobs completed per second (first start → last completion)",
            spread([r["completed_per_s"] for r in results], "{:,.1f}")),
        row("API RSS before queuing, MB", spread([r["rss_before"] for r in results], "{:,.0f}")),
        row("API RSS after queuing, MB", spread([r["rss_queued"] for r in results], "{:,.0f}")),
        row("API RSS after every job completed, MB", spread([r["rss_after"] for r in results], "{:,.0f}")),
        "",
        f"Goal ≥ {GOAL_JOBS_PER_S:.0f} jobs/s dispatched: **{verdict}**. Runs reuse one stack, so RSS after run N "
        "is RSS before run N+1: flat means it does not climb from run to run.",
        "",
    ])
