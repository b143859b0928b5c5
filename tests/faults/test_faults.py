"""Fault injection on real processes under `visionyard up`: while a job trains, kill -9 a runner, the
tracker, storage, the API or nats-server (and let `up` bring it back), lock the MLflow store, or cancel
the job; then prove nothing was lost.

After every scenario, the proof of `tests/jobproof.py`: the job's final status is right; every progress
event the runners published (read back from the EVENTS stream) is in MLflow exactly once per (metric,
step) (a missing or an extra point fails); every checkpoint object in S3 (moto) has the sha256 the API
reports; and no process of the job is left. Each scenario records its figures (events emitted vs
recorded, time to recover) in `<pytest basetemp>/fault-figures.json` and in the terminal summary.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from visionyard.shared.events import JobStarted, ProgressReported

from .. import jobproof
from ..jobproof import (
    TERMINAL,
    Proof,
    get_job,
    job_events,
    job_processes,
    poll,
    stored_checkpoints,
)
from .conftest import UpStack

pytestmark = pytest.mark.e2e

EPOCHS = 6


@pytest.fixture
def proof(stack: UpStack, api: httpx.Client, s3: dict[str, Any], figures: list[dict[str, Any]],
          figures_file: Path) -> Proof:
    """The after-fault checks."""
    return Proof(api=api, nats_url=stack.nats_url, tracking_uri=stack.tracking_uri, data_dir=stack.data_dir, s3=s3,
                 figures=figures, figures_file=figures_file)


def start_job(api: httpx.Client, dataset_id: str, *, epochs: int = EPOCHS) -> str:
    """Create and start a simple_cnn job on digits; its id."""
    return jobproof.start_job(api, dataset_id, epochs=epochs, experiment="faults")


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
    trainers = job_processes(stack.data_dir, job_id)
    assert len(trainers) == 1, trainers
    # For a runner: the one holding the job (its trainer's parent).
    name = stack.name_of(trainers[0][1]) if target == "runner" else target
    restarts_before = stack.restarts()
    killed_at = time.monotonic()
    killed = stack.kill(name)
    if target == "runner":
        # The orphaned trainer dies with its runner: it must not keep training beside the new attempt.
        poll(lambda: [pid for pid, _ in job_processes(stack.data_dir, job_id) if pid == trainers[0][0]], lambda left: not left,
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
    progress = [ProgressReported.model_validate(raw) for raw in job_events(stack.nats_url, job_id, "progress")]
    assert {event.epoch for event in progress} == set(range(1, EPOCHS + 1))
    assert final["current_epoch"] == EPOCHS
    assert stored_checkpoints(api, job_id)["last"]["epoch"] == EPOCHS
    if target != "runner":
        if target != "nats-server":
            assert final["attempt"] == 1, "a service outage must not cost the job an attempt"
        return
    # The runner's job resumed (on the other runner or the restarted one) from its last checkpoint.
    starts = [JobStarted.model_validate(raw) for raw in job_events(stack.nats_url, job_id, "started")]
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
    assert job_processes(stack.data_dir, job_id)
    asked_at = time.monotonic()
    reply = api.post(f"/api/v1/training/jobs/{job_id}/cancel")
    assert reply.status_code == 200 and reply.json()["status"] == "cancelling", reply.text
    poll(lambda: get_job(api, job_id), lambda j: j["status"] in TERMINAL, timeout=60)
    proof.check(job_id, expected_status="cancelled", scenario="cancel while training",
                cancel_to_cancelled_s=time.monotonic() - asked_at, fault_at=asked_at)
    again = api.post(f"/api/v1/training/jobs/{job_id}/cancel")
    assert again.status_code == 409 and "cancelled" in again.json()["detail"]
