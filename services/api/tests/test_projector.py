"""Projection use cases on a real (migrated) SQLite database: idempotent, fenced, completion-gated."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from visionyard.api.db.models import Checkpoint, Dataset, DatasetVersion, TrainingJob, TrainingLog, TrainingMetric
from visionyard.api.projector import Projector
from visionyard.shared.events import (
    ArtifactStored,
    CheckpointStaged,
    DatasetReady,
    DatasetRejected,
    FailureReason,
    JobCompleted,
    JobFailed,
    JobStarted,
    JobTracked,
    LogEmitted,
    ProgressReported,
)
from visionyard.shared.messages import Message


def _seed(session_factory: sessionmaker[Session], *, status: str = "queued", attempt: int = 1) -> None:
    with session_factory() as session, session.begin():
        session.add(Dataset(id="d1", name="digits", status="ready", content_hash="h1", class_names=[], class_counts={},
                            splits={}, task_types=[]))
        session.add(TrainingJob(
            id="j1", project_id="default", experiment_name="visionyard-default", tags=[], framework="pytorch",
            model_name="simple_cnn", task_type="image_classification", dataset_id="d1", dataset_snapshot_id="h1",
            epochs=2, batch_size=8, learning_rate=0.01, primary_metric="accuracy", primary_metric_mode="max",
            status=status, attempt=attempt,
        ))


def _apply(projector: Projector, *events: Message) -> list:
    return projector.apply_batch([(index, event) for index, event in enumerate(events)])


def _job(session_factory: sessionmaker[Session]) -> TrainingJob:
    with session_factory() as session:
        job = session.get(TrainingJob, "j1")
        assert job is not None
        return job


def _count(session_factory: sessionmaker[Session], model: type) -> int:
    with session_factory() as session:
        return session.scalar(select(func.count()).select_from(model)) or 0


def _staged(kind: str, seq: int, sha: str = "a" * 64) -> CheckpointStaged:
    return CheckpointStaged(job_id="j1", attempt=1, seq=seq, checkpoint_kind=kind, object_name=f"ckpt/j1/1/{seq}-{kind}.pt",
                            sha256=sha, size_bytes=10, epoch=2)


def _stored(kind: str, seq: int, sha: str = "a" * 64) -> ArtifactStored:
    return ArtifactStored(job_id="j1", attempt=1, seq=seq, checkpoint_kind=kind, uri=f"file:///ckpt/j1/{kind}.pt",
                          sha256=sha, size_bytes=10, epoch=2)


def test_run_is_projected_once_even_when_every_event_is_delivered_twice(session_factory: sessionmaker[Session]) -> None:
    _seed(session_factory)
    projector = Projector(session_factory)
    run = [
        JobStarted(job_id="j1", attempt=1, seq=1, runner_id="r1"),
        ProgressReported(job_id="j1", attempt=1, seq=2, epoch=1, total_epochs=2,
                         metrics={"loss": 0.9, "accuracy": 0.5, "learning_rate": 0.01, "train_loss": 1.1}),
        LogEmitted(job_id="j1", attempt=1, seq=3, message="epoch 1 done", event_type="stdout"),
        ProgressReported(job_id="j1", attempt=1, seq=4, epoch=2, total_epochs=2, metrics={"loss": 0.4, "accuracy": 0.9}),
        JobTracked(job_id="j1", attempt=1, run_id="run-1", experiment_id="1"),
    ]
    _apply(projector, *run)
    _apply(projector, *run)  # redelivery
    job = _job(session_factory)
    assert (job.status, job.current_epoch, job.progress_percent, job.mlflow_run_id) == ("running", 2, 100.0, "run-1")
    assert job.started_at is not None
    assert _count(session_factory, TrainingMetric) == 2
    assert _count(session_factory, TrainingLog) == 1
    with session_factory() as session:
        first = session.scalars(select(TrainingMetric).order_by(TrainingMetric.seq)).first()
        assert first is not None
        assert (first.loss, first.accuracy, first.learning_rate) == (0.9, 0.5, 0.01)
        assert first.extra_metrics == {"train_loss": 1.1}


def test_completion_waits_for_every_declared_checkpoint_in_either_order(session_factory: sessionmaker[Session]) -> None:
    _seed(session_factory, status="running")
    projector = Projector(session_factory)
    completed = JobCompleted(job_id="j1", attempt=1, seq=9, total_epochs_completed=2, final_metrics={"accuracy": 0.8},
                             best_metrics={"accuracy": 0.9}, declared_checkpoints=["best", "last"])
    _apply(projector, _staged("best", 5), _staged("last", 6), _stored("best", 5), completed)
    job = _job(session_factory)
    assert job.status == "running"  # `last` is declared but not stored yet
    assert job.final_accuracy == 0.9
    assert job.best_checkpoint_path == "file:///ckpt/j1/best.pt"
    _apply(projector, _stored("last", 6))
    job = _job(session_factory)
    assert job.status == "completed" and job.completed_at is not None
    assert job.last_checkpoint_path == "file:///ckpt/j1/last.pt"
    with session_factory() as session:
        kinds = {(c.kind, c.status) for c in session.scalars(select(Checkpoint))}
    assert kinds == {("best", "stored"), ("last", "stored")}


def test_events_of_an_older_attempt_are_ignored_and_a_newer_attempt_takes_over(
    session_factory: sessionmaker[Session],
) -> None:
    _seed(session_factory, status="running", attempt=2)
    projector = Projector(session_factory)
    _apply(projector, JobFailed(job_id="j1", attempt=1, seq=7, reason=FailureReason.TRAINER_CRASH, error_message="old"))
    assert _job(session_factory).status == "running"
    _apply(projector, JobStarted(job_id="j1", attempt=3, seq=1, runner_id="r2"))
    job = _job(session_factory)
    assert (job.attempt, job.status) == (3, "running")
    _apply(projector, JobFailed(job_id="j1", attempt=3, seq=2, reason=FailureReason.USER_ERROR, error_message="bad data"))
    _apply(projector, ProgressReported(job_id="j1", attempt=3, seq=3, epoch=1, total_epochs=2))
    job = _job(session_factory)
    assert job.status == "failed" and job.error_message == "user_error: bad data"
    assert job.current_epoch == 0  # terminal is sticky for the attempt


def test_event_for_an_unknown_job_is_rejected_without_blocking_the_rest(session_factory: sessionmaker[Session]) -> None:
    _seed(session_factory)
    projector = Projector(session_factory)
    rejected = _apply(
        projector,
        JobStarted(job_id="nope", attempt=1, seq=1, runner_id="r1"),
        JobStarted(job_id="j1", attempt=1, seq=1, runner_id="r1"),
    )
    assert [r.token for r in rejected] == [0]
    assert _job(session_factory).status == "running"


def test_dataset_ready_adds_an_immutable_version_and_rejection_keeps_it(session_factory: sessionmaker[Session]) -> None:
    with session_factory() as session, session.begin():
        session.add(Dataset(id="d2", name="x", status="processing", class_names=[], class_counts={}, splits={}, task_types=[]))
    projector = Projector(session_factory)
    ready = DatasetReady(dataset_id="d2", content_hash="h2", format="imagefolder", num_images=10, num_classes=2,
                         class_names=["a", "b"], class_counts={"a": 5, "b": 5}, size_bytes=2048, uri="file:///x")
    _apply(projector, ready, ready)
    _apply(projector, DatasetRejected(dataset_id="d2", reason="evil.zip: path traversal"))
    with session_factory() as session:
        dataset = session.get(Dataset, "d2")
        assert dataset is not None
        assert (dataset.status, dataset.content_hash, dataset.num_images, dataset.class_names) == ("ready", "h2", 10, ["a", "b"])
        assert dataset.rejection_reason == "evil.zip: path traversal"
    assert _count(session_factory, DatasetVersion) == 1
