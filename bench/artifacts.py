"""Artifacts: a large checkpoint staged by the runner and stored in S3 by storage, against a direct boto3
upload of a same-size file to the same S3 endpoint (moto_server on loopback); and how often a dataset
version is staged when several jobs on several runners train on it.

Platform time: from the trainer declaring the checkpoint (its file already written) to storage
publishing `artifact_stored` (the object copied to S3 and its sha256 checked).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from pathlib import Path

import boto3
import nats

from bench.harness import BenchStack, row, spread, synthetic_config, tiny_imagefolder_zip
from visionyard.shared import subjects
from visionyard.shared.s3server import MotoS3Server

GOAL_RATIO = 0.5
CREDENTIALS = {"aws_access_key_id": "bench", "aws_secret_access_key": "bench"}


def direct_upload_seconds(endpoint: str, path: Path) -> float:
    """Seconds for boto3's managed upload of `path` to a fresh bucket on `endpoint`."""
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **CREDENTIALS)
    bucket = f"direct-{time.time_ns()}"
    s3.create_bucket(Bucket=bucket)
    start = time.perf_counter()
    s3.upload_file(str(path), bucket, "checkpoint.pt")
    return time.perf_counter() - start


async def platform_seconds(bench: BenchStack, dataset_id: str, *, megabytes: int) -> float:
    """Seconds from the trainer declaring a `megabytes` checkpoint to `artifact_stored`."""
    nc = await nats.connect(bench.nats_url)
    declared: dict[str, float] = {}
    stored: dict[str, float] = {}
    arrived = asyncio.Event()

    async def on_log(msg: nats.aio.msg.Msg) -> None:
        event = json.loads(msg.data)
        if event.get("event_type") == "bench_checkpoint":
            declared[event["job_id"]] = event["data"]["t_declared"]

    async def on_stored(msg: nats.aio.msg.Msg) -> None:
        stored[json.loads(msg.data)["job_id"]] = time.time()
        arrived.set()

    await nc.subscribe(subjects.job_event("*", "log"), cb=on_log)
    await nc.subscribe(subjects.job_event("*", "artifact_stored"), cb=on_stored)
    try:
        job_id = bench.create_job(synthetic_config(dataset_id, events=1, checkpoint_mb=megabytes))
        await asyncio.to_thread(bench.start_job, job_id)
        deadline = time.monotonic() + 300
        while job_id not in stored:
            arrived.clear()
            await asyncio.wait_for(arrived.wait(), timeout=max(0.1, deadline - time.monotonic()))
        await asyncio.to_thread(bench.wait_jobs, [job_id])
        return stored[job_id] - declared[job_id]
    finally:
        await nc.close()


async def stagings(bench: BenchStack, dataset_id: str, *, jobs: int) -> int:
    """How many `storage.stage` requests `jobs` jobs on a fresh dataset cause."""
    nc = await nats.connect(bench.nats_url)
    requests: list[bytes] = []

    async def on_stage(msg: nats.aio.msg.Msg) -> None:
        requests.append(msg.data)

    await nc.subscribe(subjects.STORAGE_STAGE, cb=on_stage)
    try:
        job_ids = [bench.create_job(synthetic_config(dataset_id, events=1)) for _ in range(jobs)]
        for job_id in job_ids:
            await asyncio.to_thread(bench.start_job, job_id)
        await asyncio.to_thread(bench.wait_jobs, job_ids)
        # A second wave on the same dataset: every runner has it cached by now.
        again = [bench.create_job(synthetic_config(dataset_id, events=1)) for _ in range(jobs)]
        for job_id in again:
            await asyncio.to_thread(bench.start_job, job_id)
        await asyncio.to_thread(bench.wait_jobs, again)
    finally:
        await nc.close()
    return len(requests)


async def run(scratch: Path, *, quick: bool, runs: int) -> str:
    """Measure direct and platform uploads `runs` times each, and dataset stagings; the report section."""
    megabytes = 20 if quick else 200
    jobs = 4 if quick else 8
    sample = scratch / "direct.pt"
    with sample.open("wb") as handle:
        for _ in range(megabytes):
            handle.write(os.urandom(1 << 20))
    moto = MotoS3Server(log_path=scratch / "moto.log").start()
    direct: list[float] = []
    through: list[float] = []
    try:
        storage_env = {"VISIONYARD_STORAGE_S3_ENDPOINT_URL": moto.url,
                       "VISIONYARD_STORAGE_S3_ACCESS_KEY_ID": "bench",
                       "VISIONYARD_STORAGE_S3_SECRET_ACCESS_KEY": "bench"}
        with BenchStack(scratch / "artifacts", runners=2, slots=2, storage_backend="s3",
                        storage_env=storage_env) as bench:
            dataset_id = bench.upload(tiny_imagefolder_zip(scratch / "tiny.zip"))
            staged = await stagings(bench, dataset_id, jobs=jobs)
            for _ in range(runs):
                direct.append(await asyncio.to_thread(direct_upload_seconds, moto.url, sample))
                through.append(await platform_seconds(bench, dataset_id, megabytes=megabytes))
    finally:
        moto.stop()
    ratio = statistics.median(direct) / statistics.median(through)
    ratio_verdict = "meets" if ratio >= GOAL_RATIO else "misses"
    staging_verdict = "meets" if staged <= 2 else "misses"
    return "\n".join([
        f"## Artifacts: a {megabytes} MB checkpoint staged and stored, vs a direct boto3 upload",
        "",
        "| path | seconds median (min–max) | MB/s (median) |",
        "|---|---|---|",
        row("direct boto3 `upload_file` to the same endpoint (baseline)", spread(direct, "{:.2f}"),
            f"{megabytes / statistics.median(direct):,.0f}"),
        row("trainer declares → runner stages → storage stores in S3", spread(through, "{:.2f}"),
            f"{megabytes / statistics.median(through):,.0f}"),
        "",
        f"Ratio (direct ÷ platform time): **{ratio:.2f}** (goal ≥ {GOAL_RATIO}): **{ratio_verdict}**. Dataset "
        f"stagings for {2 * jobs} jobs (two waves of {jobs}) on 2 runners: **{staged}** (goal: at most one per "
        f"runner, never again): **{staging_verdict}**.",
        "",
    ])
