"""The tracker in-process against a real nats-server and a real MLflow SQLite store."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from visionyard.shared import streams, subjects
from visionyard.shared.bus import Bus
from visionyard.shared.events import JobCompleted, JobStarted, JobTracked, LogEmitted, ProgressReported
from visionyard.shared.natsserver import NatsServer
from visionyard.shared.requests import TrackerQuery
from visionyard.tracker.adapters.mlflow_store import MlflowRunStore
from visionyard.tracker.config import TrackerSettings
from visionyard.tracker.main import serve
from visionyard.tracker.ports import LogBatch, RunStore, RunWrite

pytestmark = pytest.mark.integration

T0 = datetime(2025, 3, 1, tzinfo=UTC)


def job_events(job_id: str) -> list[Any]:
    """Started, three epochs, completed: what a runner publishes for a short job."""
    events: list[Any] = [
        JobStarted(
            job_id=job_id,
            attempt=1,
            seq=1,
            runner_id="runner-a",
            project_id="proj",
            dataset_hash="d" * 64,
            params={"framework": "pytorch", "model_name": "simple_cnn", "epochs": 3, "learning_rate": 0.01},
            occurred_at=T0,
        )
    ]
    for epoch in (1, 2, 3):
        events.append(
            ProgressReported(
                job_id=job_id,
                attempt=1,
                seq=epoch + 1,
                epoch=epoch,
                total_epochs=3,
                metrics={"loss": 1.0 / epoch, "accuracy": 0.25 * epoch, "learning_rate": 0.01},
                occurred_at=T0 + timedelta(seconds=epoch),
            )
        )
    events.append(
        JobCompleted(
            job_id=job_id,
            attempt=1,
            seq=5,
            total_epochs_completed=3,
            best_metrics={"accuracy": 0.75},
            best_epoch=3,
            occurred_at=T0 + timedelta(seconds=4),
        )
    )
    return events


@asynccontextmanager
async def running_tracker(settings: TrackerSettings, store: RunStore | None = None) -> AsyncIterator[None]:
    """The tracker serving in this event loop until the block ends."""
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, stop=stop, store=store))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=30)


async def drained(bus: Bus, *, until: Callable[[], bool] = lambda: True) -> None:
    """Wait until the tracker consumer holds nothing pending or unacknowledged (and `until` holds)."""

    async def poll() -> None:
        while True:
            info = await bus.js.consumer_info(streams.TRACKER.stream, streams.TRACKER.durable)
            if info.num_pending == 0 and info.num_ack_pending == 0 and until():
                return
            await asyncio.sleep(0.1)

    await asyncio.wait_for(poll(), timeout=60)


def only_run(client: MlflowClient, job_id: str) -> Any:
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    runs = client.search_runs(
        experiments, filter_string=f"tags.`visionyard.job_id` = '{job_id}'", run_view_type=ViewType.ALL
    )
    assert len(runs) == 1, f"expected one run for {job_id}, found {len(runs)}"
    return runs[0]


async def tracked_count(bus: Bus) -> int:
    info = await bus.js.stream_info(streams.EVENTS.name, subjects_filter="evt.job.*.tracked")
    return sum((info.state.subjects or {}).values())


@pytest.fixture
def settings(nats_server: NatsServer, tmp_path: Path) -> TrackerSettings:
    return TrackerSettings(nats_url=nats_server.url, data_dir=tmp_path / "data")


async def test_job_events_become_one_mlflow_run_that_survives_replay(bus: Bus, settings: TrackerSettings) -> None:
    events = job_events("job-1")
    for event in events:
        await bus.publish(event)
    # A producer retry: same content, different message id, so JetStream stores it twice.
    await bus.publish(events[2].model_copy(update={"message_id": "retry-of-epoch-2"}))
    await bus.publish(LogEmitted(job_id="job-1", attempt=1, seq=9, message="ignored by the tracker"))
    await bus.publish_raw(subjects.job_event("job-1", "progress"), b"{broken", message_id="poison")

    async with running_tracker(settings):
        await drained(bus)
        metrics = json.loads(await bus.request(subjects.TRACKER_METRICS, TrackerQuery(job_id="job-1")))
        summary = json.loads(await bus.request(subjects.TRACKER_SUMMARY, TrackerQuery(job_id="job-1")))
        unknown = json.loads(await bus.request(subjects.TRACKER_SUMMARY, TrackerQuery(job_id="nobody")))

    client = MlflowClient(tracking_uri=settings.mlflow_uri)
    run = only_run(client, "job-1")
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "job-1"
    assert client.get_experiment(run.info.experiment_id).name == "visionyard-proj"
    assert run.data.params["model_name"] == "simple_cnn" and run.data.params["dataset_hash"] == "d" * 64
    for key in ("loss", "accuracy", "learning_rate"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == [1, 2, 3]
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "best_accuracy")] == [(3, 0.75)]

    tracked = await bus.js.get_last_msg(streams.EVENTS.name, subjects.job_event("job-1", "tracked"))
    assert JobTracked.model_validate_json(tracked.data).run_id == run.info.run_id
    assert (await bus.js.stream_info(streams.DEADLETTERS.name)).state.messages == 1

    assert metrics["found"] and metrics["run_id"] == run.info.run_id and metrics["status"] == "FINISHED"
    assert [p["value"] for p in metrics["metrics"]["loss"]] == [1.0, 0.5, 1 / 3]
    assert metrics["params"]["epochs"] == "3"
    assert metrics["start_time"] == int(T0.timestamp() * 1000)
    assert metrics["end_time"] == int((T0 + timedelta(seconds=4)).timestamp() * 1000)
    assert summary["latest_metrics"]["accuracy"] == 0.75
    assert summary["best_metrics"]["loss"] == 1 / 3 and summary["best_metrics"]["accuracy"] == 0.75
    assert summary["artifact_uri"].startswith("file://")
    assert unknown == {
        "found": False, "run_id": None, "status": None, "latest_metrics": {}, "params": {},
        "best_metrics": {}, "start_time": None, "end_time": None, "artifact_uri": None,
    }

    # Restart with the consumer reset: the whole stream is replayed into the same store.
    await bus.js.delete_consumer(streams.TRACKER.stream, streams.TRACKER.durable)
    await bus.js.add_consumer(streams.TRACKER.stream, config=streams.consumer_config(streams.TRACKER))
    async with running_tracker(settings):
        await drained(bus)
    replayed = only_run(client, "job-1")
    assert replayed.info.run_id == run.info.run_id and replayed.info.status == "FINISHED"
    for key in ("loss", "accuracy", "learning_rate"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == [1, 2, 3]
    assert await tracked_count(bus) == 1


class FlakyStore:
    """The real MLflow store, unreachable for its first `failures` metric writes."""

    def __init__(self, inner: MlflowRunStore, *, failures: int) -> None:
        self._inner = inner
        self.failures_left = failures

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def write(self, writes: Sequence[RunWrite]) -> None:
        if any(isinstance(w, LogBatch) and w.metrics for w in writes) and self.failures_left > 0:
            self.failures_left -= 1
            raise ConnectionError("MLflow tracking server unreachable")
        await self._inner.write(writes)


async def test_events_wait_out_an_mlflow_outage_and_are_not_lost(bus: Bus, settings: TrackerSettings) -> None:
    for event in job_events("job-2"):
        await bus.publish(event)
    inner = MlflowRunStore(tracking_uri=settings.mlflow_uri, artifact_root=settings.artifact_root)
    flaky = FlakyStore(inner, failures=2)
    try:
        async with running_tracker(settings, store=flaky):  # type: ignore[arg-type]
            await drained(bus, until=lambda: flaky.failures_left == 0)
    finally:
        inner.close()

    client = MlflowClient(tracking_uri=settings.mlflow_uri)
    run = only_run(client, "job-2")
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == [1, 2, 3]
    assert (await bus.js.stream_info(streams.DEADLETTERS.name)).state.messages == 0


async def test_console_script_answers_then_exits_cleanly_on_sigterm(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    import os
    import signal
    import subprocess
    import sys

    from visionyard.shared.bus import TransientError

    script = Path(sys.executable).with_name("visionyard-tracker")
    env = {
        **os.environ,
        "VISIONYARD_TRACKER_NATS_URL": nats_server.url,
        "VISIONYARD_TRACKER_DATA_DIR": str(tmp_path / "data"),
    }
    process = subprocess.Popen([str(script)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async def first_answer() -> dict[str, Any]:
            while True:
                try:
                    return json.loads(await bus.request(subjects.TRACKER_SUMMARY, TrackerQuery(job_id="x"), timeout=1))
                except TransientError:
                    await asyncio.sleep(0.2)

        answer = await asyncio.wait_for(first_answer(), timeout=60)
        assert answer["found"] is False
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert (tmp_path / "data" / "mlflow" / "mlflow.db").exists()
