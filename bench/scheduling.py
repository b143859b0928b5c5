"""Scheduling: 1,000 queued synthetic jobs from 4 projects with mixed priorities, drained by 4 runners.

Four projects with fair-share weights 1, 1, 2 and 4 queue 125, 125, 250 and 500 jobs (in proportion, so all
four wait until the end), each project's jobs 10 % high, 70 % normal and 20 % low priority in a seeded
shuffle, the projects' jobs interleaved at random. As in the scale figure the runners are stopped while
the jobs are queued through REST, then started again; "started" is a runner publishing `started`.

Reported: the dispatch rate (first `started` to last, as the scale figure counts it); every pair of a
high-priority job and a normal one queued after it that started in the wrong order (goal: none); and each
project's share of the starts in consecutive windows of 250 starts against its weight's share
(|share - weight share| / weight share; goal: at most 10 % in every window).
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import nats

from bench.harness import BenchStack, row, spread, synthetic_config, tiny_imagefolder_zip
from visionyard.cli.stack import _stop_group
from visionyard.shared import subjects

GOAL_JOBS_PER_S = 50.0
GOAL_SHARE_DEVIATION = 0.10
RUNNERS = 4
WEIGHTS = (1, 1, 2, 4)
MIX = (("high", 0.1), ("normal", 0.7), ("low", 0.2))
WINDOW = 250


def window_size(jobs: int) -> int:
    """Starts per share window: 250, or a quarter of a smaller run."""
    return min(WINDOW, max(jobs // 4, 1))


def job_plan(total: int, *, seed: int) -> list[tuple[int, str]]:
    """(project index, priority) of each job in queue order: counts in proportion to the weights, exact mixes."""
    rng = random.Random(seed)
    plan: list[tuple[int, str]] = []
    per_project = [total * weight // sum(WEIGHTS) for weight in WEIGHTS]
    per_project[-1] += total - sum(per_project)
    for index, count in enumerate(per_project):
        levels = [level for level, share in MIX for _ in range(round(count * share))]
        levels += ["normal"] * (count - len(levels))
        rng.shuffle(levels)
        plan += [(index, level) for level in levels[:count]]
    rng.shuffle(plan)
    return plan


async def queue_plan(api_url: str, dataset_id: str, projects: list[int], plan: list[tuple[int, str]],
                     *, concurrency: int = 8) -> dict[int, tuple[int, str]]:
    """Create and start every planned job through REST; job id → (project index, priority)."""
    limit = asyncio.Semaphore(concurrency)
    jobs: dict[int, tuple[int, str]] = {}
    async with httpx.AsyncClient(base_url=api_url, timeout=60) as http:

        async def one(project: int, priority: str) -> None:
            async with limit:
                created = await http.post("/api/v1/training/jobs", json={
                    "config": synthetic_config(dataset_id, events=1), "project_id": projects[project],
                    "priority": priority})
                created.raise_for_status()
                job_id = created.json()["id"]
                (await http.post(f"/api/v1/training/jobs/{job_id}/start")).raise_for_status()
                jobs[job_id] = (project, priority)

        await asyncio.gather(*(one(project, priority) for project, priority in plan))
    return jobs


def queue_times(bench: BenchStack, job_ids: list[int]) -> dict[int, datetime]:
    """When each job's attempt was queued (the order equal priorities keep), read back through REST."""
    found: dict[int, datetime] = {}
    offset = 0
    wanted = set(job_ids)
    while len(found) < len(wanted):
        page = bench.client.request("GET", "/api/v1/training/jobs", params={"limit": 500, "offset": offset})
        if not page["jobs"]:
            break
        for job in page["jobs"]:
            if job["id"] in wanted and job.get("queued_at"):
                found[job["id"]] = datetime.fromisoformat(job["queued_at"])
        offset += 500
    return found


def order_violations(started: list[int], jobs: dict[int, tuple[int, str]], queued: dict[int, datetime]) -> int:
    """Pairs (high h, normal n) with n queued after h that started before h."""
    position = {job_id: index for index, job_id in enumerate(started)}
    highs = [job_id for job_id, (_, level) in jobs.items() if level == "high"]
    normals = [job_id for job_id, (_, level) in jobs.items() if level == "normal"]
    return sum(1 for high in highs for normal in normals
               if queued[normal] > queued[high] and position[normal] < position[high])


def share_deviation(started: list[int], jobs: dict[int, tuple[int, str]], *, size: int) -> tuple[float, list[list[float]]]:
    """The largest |share - weight share| / weight share over consecutive windows of `size` starts (and each
    window's shares)."""
    total_weight = sum(WEIGHTS)
    worst = 0.0
    windows: list[list[float]] = []
    for begin in range(0, len(started) - size + 1, size):
        window = started[begin:begin + size]
        counts = [0] * len(WEIGHTS)
        for job_id in window:
            counts[jobs[job_id][0]] += 1
        shares = [count / len(window) for count in counts]
        windows.append(shares)
        for index, weight in enumerate(WEIGHTS):
            expected = weight / total_weight
            worst = max(worst, abs(shares[index] - expected) / expected)
    return worst, windows


async def drain_once(bench: BenchStack, dataset_id: str, projects: list[int], *, jobs: int, seed: int) -> dict[str, Any]:
    """Queue the plan with no runner, start 4 runners, wait for every completion; the figures of one run."""
    for service in [s for s in bench.stack.services if s.name.startswith("runner")]:
        _stop_group(service.process, timeout=20)
        bench.stack.services.remove(service)
    plan = job_plan(jobs, seed=seed)
    queued_jobs = await queue_plan(bench.stack.api_url, dataset_id, projects, plan)
    nc = await nats.connect(bench.nats_url)
    started: list[tuple[float, int]] = []
    completed: set[int] = set()
    finished = asyncio.Event()

    async def on_started(msg: nats.aio.msg.Msg) -> None:
        job_id = int(json.loads(msg.data)["job_id"])
        if job_id in queued_jobs:
            started.append((time.perf_counter(), job_id))

    async def on_completed(msg: nats.aio.msg.Msg) -> None:
        job_id = int(json.loads(msg.data)["job_id"])
        if job_id in queued_jobs:
            completed.add(job_id)
            if len(completed) >= len(queued_jobs):
                finished.set()

    await nc.subscribe(subjects.job_event("*", "started"), cb=on_started)
    await nc.subscribe(subjects.job_event("*", "completed"), cb=on_completed)
    try:
        for index in range(1, RUNNERS + 1):
            bench.stack._spawn("runner", label=f"runner-{index}", index=index)
        await asyncio.wait_for(finished.wait(), timeout=900)
    finally:
        await nc.close()
    order = [job_id for _, job_id in started]
    queued = await asyncio.to_thread(queue_times, bench, list(queued_jobs))
    worst, windows = share_deviation(order, queued_jobs, size=window_size(jobs))
    times = [moment for moment, _ in started]
    return {
        "dispatched_per_s": (len(times) - 1) / (max(times) - min(times)),
        "violations": order_violations(order, queued_jobs, queued),
        "pairs": sum(1 for h in queued_jobs.values() if h[1] == "high") * sum(1 for n in queued_jobs.values() if n[1] == "normal"),
        "share_deviation": worst,
        "windows": windows,
        "starts": len(order),
        "distinct": len(set(order)),
    }


async def run(scratch: Path, *, quick: bool, runs: int) -> str:
    """Drain `runs` mixed-priority queues of 4 projects with 4 runners; the report section."""
    jobs = 200 if quick else 1_000
    results = []
    with BenchStack(scratch / "scheduling", runners=RUNNERS, slots=4) as bench:
        dataset_id = bench.upload(tiny_imagefolder_zip(scratch / "tiny.zip"))
        projects = []
        for index, weight in enumerate(WEIGHTS):
            project = bench.client.request("POST", "/api/v1/projects", json={"name": f"team-{index + 1}"})["id"]
            bench.client.request("PUT", f"/api/v1/projects/{project}/scheduling", json={"weight": weight})
            projects.append(project)
        for index in range(runs):
            results.append(await drain_once(bench, dataset_id, projects, jobs=jobs, seed=index))
    dispatched = [r["dispatched_per_s"] for r in results]
    deviations = [r["share_deviation"] * 100 for r in results]
    violations = [r["violations"] for r in results]
    verdicts = {
        "rate": "meets" if statistics.median(dispatched) >= GOAL_JOBS_PER_S else "misses",
        "order": "meets" if max(violations) == 0 else "misses",
        "share": "meets" if max(deviations) <= GOAL_SHARE_DEVIATION * 100 else "misses",
    }
    weight_shares = ", ".join(f"{100 * w / sum(WEIGHTS):.1f} %" for w in WEIGHTS)
    measured = "; ".join(", ".join(f"{100 * share:.1f}" for share in window) for window in results[0]["windows"])
    return "\n".join([
        f"## Scheduling: {jobs:,} queued jobs of 4 projects (weights {', '.join(map(str, WEIGHTS))}), "
        f"mixed priorities, {RUNNERS} runners × 4 slots",
        "",
        "Each project queues jobs in proportion to its weight, 10 % high, 70 % normal, 20 % low priority; the runners "
        "start once all are queued. The elected scheduler (an API replica) admits each job; runners pull what it "
        "admitted (docs/scheduling.md).",
        "",
        "| figure | median (min–max) |",
        "|---|---|",
        row("jobs dispatched per second (runner spawned the trainer)", spread(dispatched, "{:,.1f}")),
        row("high-priority jobs that started after a normal one queued after them (of "
            f"{results[0]['pairs']:,} pairs)", spread(violations, "{:,.0f}")),
        row(f"largest deviation of a project's share of starts from its weight's share, per {window_size(jobs)} starts, %",
            spread(deviations, "{:,.1f}")),
        row("jobs started once each (of those queued)",
            " / ".join(f"{r['distinct']:,} of {r['starts']:,} starts" for r in results)),
        "",
        f"Weight shares {weight_shares}; measured shares per window of the first run (%): {measured}.",
        "",
        f"Goals: ≥ {GOAL_JOBS_PER_S:.0f} jobs/s dispatched: **{verdicts['rate']}**; every high-priority job before any "
        f"normal one queued after it: **{verdicts['order']}**; every project within "
        f"{GOAL_SHARE_DEVIATION:.0%} of its weight: **{verdicts['share']}**.",
        "",
    ])
