"""Unit tests of the tracker's use cases against in-memory fakes of MLflow and the bus."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from visionyard.shared.events import (
    ArtifactStored,
    FailureReason,
    JobCancelled,
    JobCompleted,
    JobEvent,
    JobFailed,
    JobStarted,
    JobTracked,
    ProgressReported,
)
from visionyard.tracker.ports import MetricPoint
from visionyard.tracker.service import Tracker, best_values, log_batches, progress_points, unique_points

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def started(job_id: str = "job1", attempt: int = 1, **params: Any) -> JobStarted:
    return JobStarted(
        job_id=job_id,
        attempt=attempt,
        seq=1,
        runner_id="r1",
        project_id="p1",
        dataset_hash="abc",
        params={"model_name": "simple_cnn", "epochs": 3, "learning_rate": 0.01, **params},
        occurred_at=T0,
    )


def progress(epoch: int, job_id: str = "job1", attempt: int = 1, **metrics: float) -> ProgressReported:
    return ProgressReported(
        job_id=job_id,
        attempt=attempt,
        seq=epoch + 1,
        epoch=epoch,
        total_epochs=3,
        metrics=metrics or {"loss": 1.0 / epoch, "accuracy": 0.3 * epoch},
        occurred_at=T0 + timedelta(seconds=epoch),
    )


def completed(job_id: str = "job1", attempt: int = 1) -> JobCompleted:
    return JobCompleted(
        job_id=job_id,
        attempt=attempt,
        seq=99,
        total_epochs_completed=3,
        best_metrics={"accuracy": 0.9},
        best_epoch=3,
        occurred_at=T0 + timedelta(seconds=10),
    )


def redelivered(event: JobEvent) -> JobEvent:
    """The same event content under a new message id (a producer retry)."""
    return event.model_copy(update={"message_id": event.message_id + "-again"})


def tracker_for(store: Any, publisher: Any, started_events: Any = None) -> Tracker:
    return Tracker(store=store, publisher=publisher, started_events=started_events)


async def test_a_job_becomes_one_finished_run_with_one_point_per_step(fake_store, fake_publisher) -> None:
    tracker = tracker_for(fake_store, fake_publisher)
    p2 = progress(2)
    await tracker.record_events([started(), progress(1), p2, redelivered(p2), progress(3), completed()])

    (run,) = fake_store.runs_of("job1")
    assert run.status == "FINISHED" and run.end_time == int((T0 + timedelta(seconds=10)).timestamp() * 1000)
    assert sorted(p.step for p in run.points if p.key == "loss") == [1, 2, 3]
    assert [(p.step, p.value) for p in run.points if p.key == "best_accuracy"] == [(3, 0.9)]
    assert run.params["model_name"] == "simple_cnn" and run.params["dataset_hash"] == "abc"
    assert run.params["epochs"] == "3"
    assert run.tags["visionyard.attempt"] == "1" and run.tags["visionyard.project_id"] == "p1"
    assert run.experiment_name == "visionyard-p1"
    # The whole batch reached the store in ONE call: one log_batch for the run (params, tags and
    # every metric together), then its status.
    assert fake_store.write_calls == 1
    assert fake_store.metric_batches == [(run.run_id, 7)] and len(fake_store.log_batch_calls) == 1
    assert fake_store.status_changes == [(run.run_id, "FINISHED", 7)]
    (tracked,) = fake_publisher.messages.values()
    assert isinstance(tracked, JobTracked) and tracked.run_id == run.run_id
    assert tracked.message_id == f"tracked-job1-{run.run_id}"


async def test_replay_after_restart_keeps_one_run_and_adds_no_points(fake_store, fake_publisher) -> None:
    batch = [started(), progress(1), progress(2), completed()]
    await tracker_for(fake_store, fake_publisher).record_events(batch)
    await tracker_for(fake_store, fake_publisher).record_events(batch)  # a fresh process, empty cache

    (run,) = fake_store.runs_of("job1")
    assert len(run.points) == 5
    assert run.status == "FINISHED"
    assert len(fake_publisher.messages) == 1


async def test_metrics_are_grouped_per_run_and_split_at_1000(fake_store, fake_publisher) -> None:
    wide = {f"m{i}": float(i) for i in range(600)}
    events: list[JobEvent] = [started("a"), started("b")]
    events += [progress(1, "a", **wide), progress(2, "a", **wide), progress(1, "b")]
    await tracker_for(fake_store, fake_publisher).record_events(events)

    run_a = fake_store.runs_of("a")[0].run_id
    run_b = fake_store.runs_of("b")[0].run_id
    # 1,200 points + 5 params + 1 tag of run a fill two calls (MLflow takes 1,000 entities per call).
    assert [(b.run_id, len(b.metrics) + len(b.params) + len(b.tags)) for b in fake_store.log_batch_calls] == [
        (run_a, 1000), (run_a, 206), (run_b, 2 + 5 + 1)
    ]
    assert len(fake_store.runs_of("a")[0].points) == 1200


async def test_stale_attempts_are_fenced_even_after_restart(fake_store, fake_publisher) -> None:
    await tracker_for(fake_store, fake_publisher).record_events(
        [started(attempt=1), progress(1, attempt=1), started(attempt=2), progress(2, attempt=1, loss=9.0)]
    )
    (run,) = fake_store.runs_of("job1")
    assert run.tags["visionyard.attempt"] == "2"
    assert 9.0 not in [p.value for p in run.points]

    restarted = tracker_for(fake_store, fake_publisher)
    await restarted.record_events([completed(attempt=1), progress(3, attempt=2, loss=0.1)])
    assert run.status == "RUNNING"  # attempt 1's completion no longer counts
    assert [p.value for p in run.points if p.key == "loss" and p.step == 3] == [0.1]


async def test_a_new_attempt_reopens_the_run_and_keeps_first_params(fake_store, fake_publisher) -> None:
    tracker = tracker_for(fake_store, fake_publisher)
    failed = JobFailed(job_id="job1", attempt=1, seq=5, reason=FailureReason.INFRASTRUCTURE, error_message="node lost")
    await tracker.record_events([started(attempt=1), failed])
    (run,) = fake_store.runs_of("job1")
    assert run.status == "FAILED" and run.tags["visionyard.failure_reason"] == "infrastructure"

    await tracker.record_events([started(attempt=2, learning_rate=0.5, resumed="yes")])
    assert run.status == "RUNNING" and run.tags["visionyard.attempt"] == "2"
    assert run.params["learning_rate"] == "0.01" and run.params["resumed"] == "yes"
    await tracker.record_events([JobCancelled(job_id="job1", attempt=2, seq=3)])
    assert run.status == "KILLED"
    assert len(fake_store.runs_of("job1")) == 1


async def test_progress_of_an_unseen_job_rebuilds_the_run_from_its_started_event(
    fake_store, fake_publisher, retained_started
) -> None:
    tracker = tracker_for(fake_store, fake_publisher, retained_started([started("lost")]))
    await tracker.record_events([progress(1, "lost"), progress(2, "orphan")])

    (lost,) = fake_store.runs_of("lost")
    assert lost.experiment_name == "visionyard-p1" and lost.params["model_name"] == "simple_cnn"
    assert len(lost.points) == 2
    (orphan,) = fake_store.runs_of("orphan")
    assert orphan.experiment_name == "visionyard-default" and len(orphan.points) == 2
    assert {m.job_id for m in fake_publisher.messages.values()} == {"lost"}


async def test_store_outage_raises_and_the_retry_applies_everything_once(fake_store, fake_publisher) -> None:
    tracker = tracker_for(fake_store, fake_publisher)
    batch = [started(), progress(1), progress(2), completed()]
    await tracker.record_events(batch[:1])
    fake_store.fail_next = 1
    with pytest.raises(ConnectionError):
        await tracker.record_events(batch)
    fake_store.fail_next = 0
    await tracker.record_events(batch)

    (run,) = fake_store.runs_of("job1")
    assert run.status == "FINISHED"
    assert sorted((p.key, p.step) for p in run.points) == [
        ("accuracy", 1), ("accuracy", 2), ("best_accuracy", 3), ("loss", 1), ("loss", 2)
    ]


async def test_artifact_stored_tags_the_checkpoint_uri(fake_store, fake_publisher) -> None:
    stored = ArtifactStored(
        job_id="job1", attempt=1, seq=7, checkpoint_kind="best", uri="file:///x/best.pt", sha256="0" * 64, size_bytes=3
    )
    await tracker_for(fake_store, fake_publisher).record_events([started(), stored])
    assert fake_store.runs_of("job1")[0].tags["checkpoint.best"] == "file:///x/best.pt"


async def test_metrics_and_summary_replies(fake_store, fake_publisher) -> None:
    tracker = tracker_for(fake_store, fake_publisher)
    await tracker.record_events([started(), progress(1), progress(2), progress(3, loss=0.8, accuracy=0.5), completed()])

    metrics = await tracker.metrics_of("job1")
    assert metrics["found"] and metrics["status"] == "FINISHED"
    assert [p["step"] for p in metrics["metrics"]["loss"]] == [1, 2, 3]
    assert metrics["params"]["model_name"] == "simple_cnn"
    assert isinstance(metrics["start_time"], int) and isinstance(metrics["end_time"], int)

    summary = await tracker.summary_of("job1")
    assert summary["latest_metrics"]["loss"] == 0.8
    assert summary["best_metrics"] == {"loss": 0.5, "accuracy": 0.6}
    assert summary["artifact_uri"]

    missing = await tracker.summary_of("nope")
    assert missing["found"] is False and missing["run_id"] is None and missing["status"] is None
    assert (await tracker.metrics_of("bad'id"))["found"] is False


def test_best_values_minimise_losses_and_maximise_the_rest() -> None:
    def series(key: str, *values: float) -> list[MetricPoint]:
        return [MetricPoint(key, v, i, i) for i, v in enumerate(values)]

    history = {
        "val_loss": series("val_loss", 0.9, 0.3, 0.5),
        "accuracy": series("accuracy", 0.2, math.nan, 0.7, 0.6),
        "empty": series("empty", math.nan),
    }
    assert best_values(history) == {"val_loss": 0.3, "accuracy": 0.7}


def test_progress_points_use_the_producer_step_and_time() -> None:
    event = ProgressReported(
        job_id="j", attempt=1, seq=1, epoch=2, total_epochs=3, step=40, metrics={"loss@x": 1.0}, occurred_at=T0
    )
    (point,) = progress_points(event)
    assert point == MetricPoint("loss_x", 1.0, 40, int(T0.timestamp() * 1000))
    assert unique_points([point, point, MetricPoint("loss_x", math.nan, 1, 1), MetricPoint("loss_x", math.nan, 1, 1)]) == [
        point, unique_points([MetricPoint("loss_x", math.nan, 1, 1)])[0]
    ]


# -- batching of writes ----------------------------------------------------------------------------


def test_log_batches_fill_calls_within_every_mlflow_limit() -> None:
    points = [MetricPoint(f"m{i % 7}", float(i), i, i) for i in range(2500)]
    params = {f"p{i}": "v" for i in range(250)}
    tags = {f"t{i}": "v" for i in range(150)}
    batches = log_batches("run", metrics=points, params=params, tags=tags)

    for batch in batches:
        assert len(batch.metrics) <= 1000 and len(batch.params) <= 100 and len(batch.tags) <= 100
        assert len(batch.metrics) + len(batch.params) + len(batch.tags) <= 1000
    # Nothing lost, nothing twice, metric order kept; and no more calls than the limits force
    # (2,900 entities need 3 calls of 1,000; 250 params need 3 calls of 100).
    assert [p for b in batches for p in b.metrics] == points
    assert {k: v for b in batches for k, v in b.params.items()} == params
    assert {k: v for b in batches for k, v in b.tags.items()} == tags
    assert len(batches) == 3
    assert log_batches("run", metrics=[], params={}, tags={}) == []


async def test_a_job_in_one_batch_costs_one_store_call_with_one_log_batch(fake_store, fake_publisher) -> None:
    tracker = tracker_for(fake_store, fake_publisher)
    await tracker.record_events([started(), progress(1), progress(2), completed()])

    (run,) = fake_store.runs_of("job1")
    assert fake_store.write_calls == 1
    (batch,) = fake_store.log_batch_calls
    assert batch.params["model_name"] == "simple_cnn" and batch.tags == {"visionyard.tracked": "true"}
    assert len(batch.metrics) == 5
    # The status went last, once all 5 points were stored.
    assert fake_store.status_changes == [(run.run_id, "FINISHED", 5)]


async def test_a_batch_that_ends_and_reopens_a_run_leaves_it_running_with_everything(
    fake_store, fake_publisher
) -> None:
    failed = JobFailed(job_id="job1", attempt=1, seq=4, reason=FailureReason.INFRASTRUCTURE, error_message="lost")
    batch = [started(attempt=1), progress(1), failed, started(attempt=2), progress(2, attempt=2), progress(1, attempt=1)]
    await tracker_for(fake_store, fake_publisher).record_events(batch)

    (run,) = fake_store.runs_of("job1")
    assert run.status == "RUNNING" and run.tags["visionyard.attempt"] == "2"
    assert run.tags["visionyard.failure_reason"] == "infrastructure"
    # attempt 1's late progress(1) is the same point as its first one; attempt 2's point is there too.
    assert sorted((p.key, p.step) for p in run.points) == [("accuracy", 1), ("accuracy", 2), ("loss", 1), ("loss", 2)]
    assert [status for _, status, _ in fake_store.status_changes] == ["RUNNING"]


async def test_params_are_logged_once_across_batches_and_restarts(fake_store, fake_publisher) -> None:
    await tracker_for(fake_store, fake_publisher).record_events([started()])
    await tracker_for(fake_store, fake_publisher).record_events([started(), progress(1)])  # restart + redelivery
    tracker = tracker_for(fake_store, fake_publisher)
    await tracker.record_events([progress(2)])
    await tracker.record_events([redelivered(started())])

    logged = [batch.params for batch in fake_store.log_batch_calls if batch.params]
    assert len(logged) == 1 and logged[0]["model_name"] == "simple_cnn"


async def test_a_crash_before_the_write_republishes_tracked_under_the_same_id(fake_store, fake_publisher) -> None:
    ids: list[str] = []

    class CountingPublisher:
        async def publish(self, message: Any) -> object:
            ids.append(message.message_id)
            return await fake_publisher.publish(message)

    class WriteFailsOnce:
        """The store dies after the run was created and JobTracked went out, before the write."""

        failed = False

        def __getattr__(self, name: str) -> Any:
            return getattr(fake_store, name)

        async def write(self, writes: Any) -> None:
            if not self.failed:
                self.failed = True
                raise ConnectionError("mlflow unavailable")
            await fake_store.write(writes)

    tracker = tracker_for(WriteFailsOnce(), CountingPublisher())
    with pytest.raises(ConnectionError):
        await tracker.record_events([started(), progress(1)])
    (run,) = fake_store.runs_of("job1")
    assert "visionyard.tracked" not in run.tags and run.points == [] and len(ids) == 1

    await tracker.record_events([started(), progress(1)])  # the redelivery
    assert len(ids) == 2 and ids[0] == ids[1]  # JetStream stores it once
    assert run.tags["visionyard.tracked"] == "true" and len(run.points) == 2


async def test_a_write_failing_halfway_is_retried_without_duplicates(fake_store, fake_publisher) -> None:
    tracker = tracker_for(fake_store, fake_publisher)
    await tracker.record_events([started("a"), started("b")])
    batch = [progress(1, "a"), progress(1, "b"), completed("a"), completed("b")]

    class HalfwayStore:
        """Applies the first write (run a's points), then fails like a store going away."""

        def __getattr__(self, name: str) -> Any:
            return getattr(fake_store, name)

        async def write(self, writes: Any) -> None:
            await fake_store.write(writes[:1])
            raise ConnectionError("mlflow unavailable")

    with pytest.raises(ConnectionError):
        await tracker_for(HalfwayStore(), fake_publisher).record_events(batch)
    await tracker.record_events(batch)

    for job_id in ("a", "b"):
        (run,) = fake_store.runs_of(job_id)
        assert run.status == "FINISHED"
        assert sorted((p.key, p.step) for p in run.points) == [
            ("accuracy", 1), ("best_accuracy", 3), ("loss", 1)
        ]
