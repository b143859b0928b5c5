"""Tracker: metric points/s written into MLflow from the event stream, against MLflow's own rates on the
same kind of store (a fresh SQLite store each): `log_batch` of 1,000 (the limit) and one `log_metric` per call.

The tracker runs as its real process against a real nats-server; the bench publishes `started` and then
progress events (10 metrics each) for several jobs as fast as JetStream takes them, samples the tracker
consumer's backlog while it works, and stops the clock when the backlog is empty. Points are counted in
the MLflow store itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.harness import REPO, row, spread
from visionyard.shared import streams
from visionyard.shared.bus import Bus
from visionyard.shared.events import JobStarted, ProgressReported
from visionyard.shared.natsserver import NatsServer

METRICS_PER_EVENT = 10
GOAL_RATIO = 0.8

_BASELINE = r'''
import json, sys, time
import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
uri, points, singles = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
client = MlflowClient(tracking_uri=uri)
experiment = client.create_experiment("baseline")
run = client.create_run(experiment).info.run_id
now = int(time.time() * 1000)
metrics = [Metric(key=f"m{i % 10}", value=float(i), timestamp=now, step=i // 10) for i in range(points)]
start = time.perf_counter()
for offset in range(0, points, 1000):
    client.log_batch(run, metrics=metrics[offset:offset + 1000])
batch_rate = points / (time.perf_counter() - start)
single_run = client.create_run(experiment).info.run_id
start = time.perf_counter()
for i in range(singles):
    client.log_metric(single_run, f"m{i % 10}", float(i), timestamp=now, step=i // 10)
single_rate = singles / (time.perf_counter() - start)
print(json.dumps({"log_batch": batch_rate, "log_metric": single_rate}))
'''


def mlflow_baseline(store: Path, *, points: int, singles: int) -> tuple[float, float]:
    """(log_batch points/s, log_metric points/s) from a plain script on a fresh SQLite store."""
    uri = f"sqlite:///{store}"
    out = subprocess.run([sys.executable, "-c", _BASELINE, uri, str(points), str(singles)], capture_output=True,
                         text=True, check=True, timeout=600)
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    return float(figures["log_batch"]), float(figures["log_metric"])


def _count_points(store: Path) -> int:
    """Metric rows in the store; 0 while the tracker is still creating it (its migrations run at start-up)."""
    with sqlite3.connect(store) as db:
        try:
            return int(db.execute("select count(*) from metrics").fetchone()[0])
        except sqlite3.OperationalError as error:
            if "no such table" in str(error):
                return 0
            raise


async def _backlog(bus: Bus) -> int:
    info = await bus.js.consumer_info(streams.TRACKER.stream, streams.TRACKER.durable)
    return int(info.num_pending or 0) + int(info.num_ack_pending or 0)


async def tracker_rate(scratch: Path, *, jobs: int, events: int) -> tuple[float, int, float]:
    """(points/s, peak backlog in events, seconds to drain after the last publish) for one fresh tracker."""
    scratch.mkdir(parents=True, exist_ok=True)
    store = scratch / "mlflow.db"
    server = NatsServer(store_dir=scratch / "nats").start()
    bus = await Bus.connect(server.url, service="bench-tracker")
    await bus.ensure_topology()
    env = {**os.environ, "VISIONYARD_TRACKER_NATS_URL": server.url, "VISIONYARD_TRACKER_DATA_DIR": str(scratch),
           "VISIONYARD_TRACKER_TRACKING_URI": f"sqlite:///{store}", "VISIONYARD_TRACKER_MODE": "embedded",
           "PYTHONPATH": str(REPO)}
    with (scratch / "tracker.log").open("wb") as log_file:
        tracker = subprocess.Popen([str(Path(sys.executable).with_name("visionyard-tracker"))], env=env,
                                   stdout=log_file, stderr=subprocess.STDOUT, cwd=scratch)
    try:
        # Runs exist before the clock starts: run creation is a one-off cost, not the stream's rate.
        await asyncio.gather(*(bus.publish(JobStarted(job_id=f"job{j}", attempt=1, seq=1, runner_id="bench",
                                                      experiment_name="bench", project_id="bench"))
                               for j in range(jobs)))
        while await _backlog(bus) or _count_points(store) == 0 and not await _runs_exist(store, jobs):
            await asyncio.sleep(0.1)
        before = _count_points(store)
        start = time.perf_counter()
        peak = 0
        for epoch in range(1, events + 1, 100):
            batch = [ProgressReported(job_id=f"job{j}", attempt=1, seq=1 + e, epoch=e, total_epochs=events,
                                      metrics={f"m{k}": e * 0.001 + k for k in range(METRICS_PER_EVENT)})
                     for e in range(epoch, min(epoch + 100, events + 1)) for j in range(jobs)]
            await asyncio.gather(*(bus.publish(event) for event in batch))
            peak = max(peak, await _backlog(bus))
        published = time.perf_counter()
        while (backlog := await _backlog(bus)) > 0:
            peak = max(peak, backlog)
            if tracker.poll() is not None:
                raise RuntimeError(f"the tracker exited with {tracker.returncode}; see {scratch / 'tracker.log'}")
            await asyncio.sleep(0.05)
        elapsed = time.perf_counter() - start
        points = _count_points(store) - before
        return points / elapsed, peak, time.perf_counter() - published
    finally:
        tracker.terminate()
        tracker.wait(timeout=30)
        await bus.close()
        server.stop()


async def _runs_exist(store: Path, jobs: int) -> bool:
    try:
        with sqlite3.connect(store) as db:
            return int(db.execute("select count(*) from runs").fetchone()[0]) >= jobs
    except sqlite3.Error:
        return False


async def run(scratch: Path, *, quick: bool, runs: int) -> str:
    """Measure MLflow's own rates and the tracker's `runs` times each; the report section."""
    jobs, events = (2, 500) if quick else (4, 5_000)
    points = jobs * events * METRICS_PER_EVENT
    singles = 200 if quick else 1_000
    batch_rates: list[float] = []
    single_rates: list[float] = []
    tracker_rates: list[float] = []
    peaks: list[int] = []
    drains: list[float] = []
    for index in range(runs):
        batch_rate, single_rate = mlflow_baseline(scratch / f"baseline-{index}.db", points=points, singles=singles)
        batch_rates.append(batch_rate)
        single_rates.append(single_rate)
        rate, peak, drain = await tracker_rate(scratch / f"tracker-{index}", jobs=jobs, events=events)
        tracker_rates.append(rate)
        peaks.append(peak)
        drains.append(drain)
    ratio = statistics.median(tracker_rates) / statistics.median(batch_rates)
    verdict = "meets" if ratio >= GOAL_RATIO else "misses"
    return "\n".join([
        "## Tracker: metric points/s into MLflow from the event stream",
        "",
        f"{jobs} jobs × {events:,} progress events × {METRICS_PER_EVENT} metrics = {points:,} points, published "
        "as fast as JetStream accepts them; the tracker (its real process) writes a fresh SQLite MLflow store. "
        "The clock stops when the tracker consumer has nothing pending or unacknowledged.",
        "",
        "| path | points/s median (min–max) |",
        "|---|---|",
        row("MLflow `log_batch`, 1,000 per call, plain script (the limit)", spread(batch_rates)),
        row("MLflow `log_metric`, one per call, plain script", spread(single_rates)),
        row("Visionyard tracker, from the stream", spread(tracker_rates)),
        "",
        f"Ratio (tracker ÷ log_batch): **{ratio:.2f}** (goal ≥ {GOAL_RATIO}: **{verdict}**); "
        f"tracker ÷ log_metric: {statistics.median(tracker_rates) / statistics.median(single_rates):.0f}×. "
        f"Peak backlog {spread([float(p) for p in peaks])} events; after the last publish the backlog "
        f"drained to 0 in {spread(drains, '{:.1f}')} s, so the stream never stays behind.",
        "",
    ])
