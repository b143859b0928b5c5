"""Fault injection on real processes under `visionyard up`: while a job trains, kill -9 a runner, the
tracker, storage, the API or nats-server (and let `up` bring it back), lock the MLflow store, or cancel
the job; then prove nothing was lost.

After every scenario: the job's final status is right; every progress event the runners published
(read back from the EVENTS stream) is in MLflow exactly once per (metric, step) (a missing or an extra
point fails); every checkpoint object in S3 (moto) has the sha256 the API reports; and no process of
the job is left. Each scenario records its figures (events emitted vs recorded, time to recover) in
`<pytest basetemp>/fault-figures.json` and in the terminal summary.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from visionyard.shared.events import JobStarted, ProgressReported

from .conftest import UpStack

pytestmark = pytest.mark.e2e

EPOCHS = 6
TERMINAL = {"completed", "failed", "cancelled"}


# -- observing the stack ------------------------------------------------------------------------


def poll(fetch: Callable[[], Any], done: Callable[[Any], bool], *, timeout: float = 180.0, every: float = 0.25) -> Any:
    """`fetch()` until `done(value)`; connection errors (a service being restarted) count as not done."""
    deadline = time.monotonic() + timeout
    value: Any = None
    while True:
        try:
            value = fetch()
            if done(value):
                return value
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s; last value: {value}")
        time.sleep(every)


def get_job(api: httpx.Client, job_id: str) -> dict[str, Any]:
    """The job as the API shows it (raises while the API is down)."""
    reply = api.get(f"/api/v1/training/jobs/{job_id}")
    reply.raise_for_status()
    return dict(reply.json())


def stored_checkpoints(api: httpx.Client, job_id: str) -> dict[str, dict[str, Any]]:
    """The job's stored checkpoints by kind."""
    reply = api.get(f"/api/v1/training/jobs/{job_id}/checkpoints")
    reply.raise_for_status()
    return {c["kind"]: c for c in reply.json()["checkpoints"]}


def job_events(stack: UpStack, job_id: str, kind: str) -> list[dict[str, Any]]:
    """Every `kind` event of the job stored in the EVENTS stream, in stream order (raw JSON)."""
    return asyncio.run(_read_subject(stack.nats_url, f"evt.job.{job_id}.{kind}"))


async def _read_subject(url: str, subject: str) -> list[dict[str, Any]]:
    import nats
    from nats.errors import TimeoutError as NatsTimeoutError
    from nats.js import api as js_api

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        sub = await js.pull_subscribe(
            subject, stream="EVENTS",
            config=js_api.ConsumerConfig(ack_policy=js_api.AckPolicy.NONE, deliver_policy=js_api.DeliverPolicy.ALL,
                                         inactive_threshold=30.0),
        )
        found: list[dict[str, Any]] = []
        while True:
            try:
                batch = await sub.fetch(500, timeout=1.0)
            except (NatsTimeoutError, asyncio.TimeoutError):
                break
            found.extend(json.loads(msg.data) for msg in batch)
        await sub.unsubscribe()
        return found
    finally:
        await nc.close()


def job_processes(stack: UpStack, job_id: str) -> list[tuple[int, int]]:
    """(pid, parent pid) of every live trainer process working in the job's directory of this stack."""
    # Job ids are small integers, the same in every stack on the machine: only this stack's data dir tells.
    inside = f"{stack.data_dir.resolve()}/"
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            cwd = os.readlink(entry / "cwd")
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # The runner trains in <work_dir>/jobs/<job id>/<attempt>: match the whole id, not a digit of a path.
        if ("visionyard.trainers" in cmdline and cwd.startswith(inside) and f"/jobs/{job_id}/" in cwd
                and stat[0] != "Z"):
            found.append((int(entry.name), int(stat[1])))
    return found


def expected_points(progress: list[dict[str, Any]]) -> Counter[tuple[str, int]]:
    """(metric, step) → how many progress events carried it (each published event counted once)."""
    counts: Counter[tuple[str, int]] = Counter()
    seen: set[tuple[int, int]] = set()
    for raw in progress:
        event = ProgressReported.model_validate(raw)
        if (event.attempt, event.seq) in seen:
            continue
        seen.add((event.attempt, event.seq))
        step = event.step if event.step is not None else event.epoch
        for key in event.metrics:
            counts[(key, step)] += 1
    return counts


def recorded_points(stack: UpStack, run_id: str, keys: set[str]) -> Counter[tuple[str, int]]:
    """(metric, step) → how many points the MLflow run holds."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=stack.tracking_uri)
    counts: Counter[tuple[str, int]] = Counter()
    for key in keys:
        for point in client.get_metric_history(run_id, key):
            counts[(key, int(point.step))] += 1
    return counts


# -- the proof every scenario ends with ------------------------------------------------------------


class Proof:
    """Runs the after-fault checks and records the scenario's figures."""

    def __init__(self, *, stack: UpStack, api: httpx.Client, s3: Any, figures: list[dict[str, Any]],
                 figures_file: Path) -> None:
        self.stack = stack
        self.api = api
        self.s3 = s3
        self.figures = figures
        self.figures_file = figures_file

    def check(self, job_id: str, *, expected_status: str, scenario: str, fault_at: float,
              **measured: Any) -> dict[str, Any]:
        """Assert status, exactly-once metrics, checkpoint integrity, no leftover process; record figures."""
        final = poll(lambda: get_job(self.api, job_id), lambda j: j["status"] in TERMINAL, timeout=240)
        measured["fault_to_terminal_s"] = time.monotonic() - fault_at
        assert final["status"] == expected_status, final

        # No process of the job is left (the runner reaps the group before the terminal event).
        leftovers = poll(lambda: job_processes(self.stack, job_id), lambda found: not found, timeout=30)
        assert leftovers == []

        # Every published progress event is in MLflow exactly once per (metric, step).
        progress = job_events(self.stack, job_id, "progress")
        expected = expected_points(progress)
        assert expected, "the trainer should have reported progress"
        keys = {key for key, _ in expected}
        run_id = poll(lambda: get_job(self.api, job_id)["mlflow_run_id"], bool, timeout=120)
        settled_at = time.monotonic()
        try:
            recorded = poll(lambda: recorded_points(self.stack, run_id, keys), lambda r: r == expected,
                            timeout=150, every=0.5)
        except AssertionError:
            recorded = recorded_points(self.stack, run_id, keys)
        mlflow_catch_up = time.monotonic() - settled_at
        time.sleep(1.0)  # a late redelivery would add its duplicate now: look once more
        recorded = recorded_points(self.stack, run_id, keys)
        mlflow_catch_up = time.monotonic() - settled_at
        missing = sum((expected - recorded).values())
        duplicates = sum((recorded - expected).values())
        assert (missing, duplicates) == (0, 0), {
            "missing": dict(expected - recorded), "duplicates": dict(recorded - expected)}

        # Every checkpoint object in S3 has the sha256 the API reports for its kind.
        prefix = f"checkpoints/{job_id}/"
        objects = poll(lambda: self._s3_pt_objects(prefix), bool, timeout=60)
        api_checkpoints = poll(lambda: stored_checkpoints(self.api, job_id),
                               lambda c: {f"{prefix}{kind}.pt" for kind in c} >= set(objects), timeout=60)
        for key, sha in objects.items():
            kind = key[len(prefix):-len(".pt")]
            assert api_checkpoints[kind]["sha256"] == sha, (key, api_checkpoints[kind])
            assert api_checkpoints[kind]["uri"].endswith(key)

        figure = {
            "scenario": scenario,
            "status": final["status"],
            "attempts": final["attempt"],
            "progress_events_emitted": len({(e["attempt"], e["seq"]) for e in progress}),
            "metric_points_expected": sum(expected.values()),
            "metric_points_recorded": sum(recorded.values()),
            "missing": missing,
            "duplicates": duplicates,
            "checkpoints_in_s3": len(objects),
            "mlflow_catch_up_after_terminal_s": round(mlflow_catch_up, 2),
            **{k: round(v, 2) if isinstance(v, float) else v for k, v in measured.items()},
        }
        self.figures.append(figure)
        existing = json.loads(self.figures_file.read_text()) if self.figures_file.exists() else []
        self.figures_file.write_text(json.dumps([*existing, figure], indent=2))
        print(f"FAULT {scenario}: {json.dumps(figure, sort_keys=True)}")
        return final

    def _s3_pt_objects(self, prefix: str) -> dict[str, str]:
        found = {}
        bucket = self.s3["bucket"]
        client = self.s3["client"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                if item["Key"].endswith(".pt"):
                    body = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
                    found[item["Key"]] = hashlib.sha256(body).hexdigest()
        return found


@pytest.fixture
def proof(stack: UpStack, api: httpx.Client, s3: dict[str, Any], figures: list[dict[str, Any]],
          figures_file: Path) -> Proof:
    """The after-fault checks."""
    return Proof(stack=stack, api=api, s3=s3, figures=figures, figures_file=figures_file)


def start_job(api: httpx.Client, dataset_id: str, *, epochs: int = EPOCHS) -> str:
    """Create and start a simple_cnn job on digits; its id."""
    body = {
        "experiment_name": "faults",
        "config": {"framework": "pytorch", "model_name": "simple_cnn", "task_type": "classification",
                   "dataset_id": dataset_id, "epochs": epochs, "batch_size": 32, "learning_rate": 0.005,
                   # 16 px keeps an epoch around a second on 2 cores: faults land mid-training, the suite stays short.
                   "advanced_config": {"image_size": 16}},
    }
    poll(lambda: api.get("/api/v1/models/list").text, lambda text: "simple_cnn" in text, timeout=60)
    created = api.post("/api/v1/training/jobs", json=body)
    assert created.status_code == 201, created.text
    job_id = str(created.json()["id"])
    started = api.post(f"/api/v1/training/jobs/{job_id}/start")
    assert started.status_code == 200, started.text
    return job_id


def wait_until_checkpointed(api: httpx.Client, job_id: str, *, epoch: int = 2) -> dict[str, Any]:
    """Until the job runs with a `last` checkpoint of at least `epoch` stored: mid-training, resumable."""
    poll(lambda: stored_checkpoints(api, job_id)["last"]["epoch"], lambda e: e is not None and e >= epoch)
    job = get_job(api, job_id)
    assert job["status"] == "running" and job["current_epoch"] < EPOCHS, "the fault must hit a running job"
    return job


@pytest.mark.parametrize("target", ["runner", "tracker", "storage", "api", "nats-server"])
def test_kill_9_under_up_the_process_comes_back_and_the_job_completes(
    target: str, stack: UpStack, api: httpx.Client, dataset_id: str, proof: Proof
) -> None:
    job_id = start_job(api, dataset_id)
    job = wait_until_checkpointed(api, job_id)
    trainers = job_processes(stack, job_id)
    assert len(trainers) == 1, trainers
    # For a runner: the one holding the job (its trainer's parent).
    name = stack.name_of(trainers[0][1]) if target == "runner" else target
    restarts_before = stack.restarts()
    killed_at = time.monotonic()
    killed = stack.kill(name)
    if target == "runner":
        # The orphaned trainer dies with its runner: it must not keep training beside the new attempt.
        poll(lambda: [pid for pid, _ in job_processes(stack, job_id) if pid == trainers[0][0]], lambda left: not left,
             timeout=10)
    stack.wait_restarted(name, killed)
    back_s = time.monotonic() - killed_at

    final = proof.check(job_id, expected_status="completed", scenario=f"kill -9 {name} under up", fault_at=killed_at,
                        attempts_before=job["attempt"], kill_to_restarted_s=back_s)
    # The stack stayed up: `up` restarted the killed process once and nothing else, and said so.
    assert {k: v - restarts_before[k] for k, v in stack.restarts().items()} == {
        k: int(k == name) for k in restarts_before}
    assert f"{name} exited with code -9; restarting it" in stack.reports()
    # Every epoch is in the EVENTS stream (for nats-server: what was stored before the kill survived on
    # disk); the proof above showed each of them in MLflow exactly once.
    progress = [ProgressReported.model_validate(raw) for raw in job_events(stack, job_id, "progress")]
    assert {event.epoch for event in progress} == set(range(1, EPOCHS + 1))
    assert final["current_epoch"] == EPOCHS
    assert stored_checkpoints(api, job_id)["last"]["epoch"] == EPOCHS
    if target != "runner":
        if target != "nats-server":
            assert final["attempt"] == 1, "a service outage must not cost the job an attempt"
        return
    # The runner's job resumed (on the other runner or the restarted one) from its last checkpoint.
    starts = [JobStarted.model_validate(raw) for raw in job_events(stack, job_id, "started")]
    resumed = next(s for s in starts if s.attempt == final["attempt"])
    assert final["attempt"] >= 2 and resumed.resumed_from_epoch is not None and resumed.resumed_from_epoch >= 2
    # The final model trained every epoch: the new attempt went on from the checkpoint to the end.
    last_attempt_epochs = [event.epoch for event in progress if event.attempt == final["attempt"]]
    assert last_attempt_epochs == list(range(resumed.resumed_from_epoch + 1, EPOCHS + 1)), last_attempt_epochs


def test_mlflow_store_locked_does_not_slow_or_lose_anything(
    stack: UpStack, api: httpx.Client, dataset_id: str, proof: Proof
) -> None:
    # The real failure: another writer holds the SQLite store's exclusive lock ("database is locked"),
    # so every MLflow call of the tracker fails until it is released.
    store = stack.data_dir / "mlflow" / "mlflow.db"
    restarts_before = stack.restarts()
    lock = sqlite3.connect(store, timeout=30, isolation_level=None)
    job_id = start_job(api, dataset_id)
    try:
        poll(lambda: get_job(api, job_id)["current_epoch"], lambda e: e >= 1)
        lock.execute("BEGIN EXCLUSIVE")
        locked_at = time.monotonic()
        # Training and the job's completion do not wait for MLflow: it completes while MLflow is still down.
        done = poll(lambda: get_job(api, job_id), lambda j: j["status"] in TERMINAL, timeout=180)
        assert done["status"] == "completed", done
        locked_s = time.monotonic() - locked_at
        assert stack.restarts() == restarts_before, "the tracker must wait the outage out"
    finally:
        lock.execute("ROLLBACK") if lock.in_transaction else None
        lock.close()
    proof.check(job_id, expected_status="completed", scenario="MLflow store locked", mlflow_locked_s=locked_s,
                fault_at=locked_at)


def test_cancel_while_training_stops_every_process(
    stack: UpStack, api: httpx.Client, dataset_id: str, proof: Proof
) -> None:
    job_id = start_job(api, dataset_id, epochs=200)
    wait_until_checkpointed(api, job_id)
    assert job_processes(stack, job_id)
    asked_at = time.monotonic()
    reply = api.post(f"/api/v1/training/jobs/{job_id}/cancel")
    assert reply.status_code == 200 and reply.json()["status"] == "cancelling", reply.text
    poll(lambda: get_job(api, job_id), lambda j: j["status"] in TERMINAL, timeout=60)
    proof.check(job_id, expected_status="cancelled", scenario="cancel while training",
                cancel_to_cancelled_s=time.monotonic() - asked_at, fault_at=asked_at)
    again = api.post(f"/api/v1/training/jobs/{job_id}/cancel")
    assert again.status_code == 409 and "cancelled" in again.json()["detail"]
