"""Job lifecycle rules on a real (migrated) SQLite database: automatic retry of infrastructure losses only,
finished jobs never reopened by a runner, and the terminal marker runners check."""

from __future__ import annotations

import json

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from visionyard.api.db.models import Checkpoint, Dataset, OutboxMessage, TrainingJob
from visionyard.api.jobstate import JobAction, JobStatus, user_transition
from visionyard.api.projector import Projector
from visionyard.api.training.projection import RetryPolicy
from visionyard.shared import streams, subjects
from visionyard.shared.commands import StartTraining
from visionyard.shared.events import FailureReason, JobCompleted, JobFailed, JobStarted, ProgressReported
from visionyard.shared.scheduling import QueueRequest


def _seed(session_factory: sessionmaker[Session], *, status: str = "running", attempt: int = 1) -> None:
    with session_factory() as session, session.begin():
        session.add(Dataset(id="d1", name="digits", status="ready", content_hash="h1", class_names=[], class_counts={},
                            splits={}, task_types=[]))
        session.add(TrainingJob(
            id="j1", project_id="default", experiment_name="visionyard-default", tags=[], framework="pytorch",
            model_name="simple_cnn", task_type="image_classification", dataset_id="d1", dataset_snapshot_id="h1",
            epochs=5, batch_size=8, learning_rate=0.01, primary_metric="accuracy", primary_metric_mode="max",
            status=status, attempt=attempt,
        ))


def _job(session_factory: sessionmaker[Session]) -> TrainingJob:
    with session_factory() as session:
        job = session.get(TrainingJob, "j1")
        assert job is not None
        return job


def _outbox(session_factory: sessionmaker[Session]) -> list[OutboxMessage]:
    with session_factory() as session:
        return list(session.scalars(select(OutboxMessage).order_by(OutboxMessage.id)).all())


def _queued_commands(session_factory: sessionmaker[Session]) -> list[StartTraining]:
    """The commands of the attempts queued through the outbox (each inside its `sched_requests` put)."""
    return [QueueRequest.model_validate_json(row.payload).command for row in _outbox(session_factory)
            if row.subject == subjects.kv_put(streams.KV_SCHED_REQUESTS, "j1")]


def _lost(attempt: int, seq: int = 9) -> JobFailed:
    return JobFailed(job_id="j1", attempt=attempt, seq=seq, reason=FailureReason.INFRASTRUCTURE,
                     error_message="could not stage the job's inputs", retryable=True)


def test_an_infrastructure_loss_is_retried_from_the_last_checkpoint(session_factory: sessionmaker[Session]) -> None:
    _seed(session_factory)
    with session_factory() as session, session.begin():
        session.add(Checkpoint(job_id="j1", kind="last", attempt=1, status="stored", uri="s3://b/checkpoints/j1/last.pt",
                               sha256="a" * 64, staged_sha256="a" * 64, epoch=3, size_bytes=10))
    Projector(session_factory, retry=RetryPolicy(max_attempts=3)).apply_batch([(0, _lost(1))])
    job = _job(session_factory)
    assert (job.status, job.attempt) == ("retrying", 2)
    commands = _queued_commands(session_factory)
    assert [c.attempt for c in commands] == [2]
    assert commands[0].resume_from is not None and commands[0].resume_from.epoch == 3
    # The new attempt's runner takes it from there.
    Projector(session_factory).apply_batch([(0, JobStarted(job_id="j1", attempt=2, seq=1, runner_id="r2"))])
    assert _job(session_factory).status == "running"


def test_retries_stop_at_max_attempts_and_the_job_fails(session_factory: sessionmaker[Session]) -> None:
    _seed(session_factory, attempt=3)
    Projector(session_factory, retry=RetryPolicy(max_attempts=3)).apply_batch([(0, _lost(3))])
    job = _job(session_factory)
    assert (job.status, job.attempt) == ("failed", 3)
    assert job.error_message is not None and job.error_message.startswith("infrastructure")
    assert not _queued_commands(session_factory)


def test_other_failures_are_not_retried(session_factory: sessionmaker[Session]) -> None:
    _seed(session_factory)
    crash = JobFailed(job_id="j1", attempt=1, seq=5, reason=FailureReason.STALLED, error_message="silent")
    Projector(session_factory).apply_batch([(0, crash)])
    assert (_job(session_factory).status, _job(session_factory).attempt) == ("failed", 1)


def test_a_cancelling_job_lost_to_infrastructure_ends_cancelled(session_factory: sessionmaker[Session]) -> None:
    _seed(session_factory, status="cancelling")
    Projector(session_factory).apply_batch([(0, _lost(1))])
    assert _job(session_factory).status == "cancelled"


def test_a_finished_job_is_not_reopened_by_a_newer_attempt_it_did_not_issue(
    session_factory: sessionmaker[Session],
) -> None:
    _seed(session_factory, status="completed")
    late = [
        JobStarted(job_id="j1", attempt=2, seq=1, runner_id="r2"),
        ProgressReported(job_id="j1", attempt=2, seq=2, epoch=5, total_epochs=5),
        JobCompleted(job_id="j1", attempt=2, seq=3, total_epochs_completed=5),
    ]
    Projector(session_factory).apply_batch(list(enumerate(late)))
    job = _job(session_factory)
    assert (job.status, job.attempt) == ("completed", 1)


def test_reaching_a_terminal_status_records_the_attempt_for_runners(session_factory: sessionmaker[Session]) -> None:
    _seed(session_factory)
    crash = JobFailed(job_id="j1", attempt=1, seq=5, reason=FailureReason.TRAINER_CRASH, error_message="boom")
    Projector(session_factory).apply_batch([(0, crash), (1, crash)])
    markers = [row for row in _outbox(session_factory) if row.subject == "$KV.job_terminal.j1"]
    assert len(markers) == 1 and json.loads(markers[0].payload)["attempt"] == 1


def test_resume_moves_a_finished_job_to_resuming_and_waiting_jobs_can_be_cancelled() -> None:
    assert user_transition("j1", "failed", JobAction.RESUME) is JobStatus.RESUMING
    for waiting in ("queued", "retrying", "resuming"):
        assert user_transition("j1", waiting, JobAction.CANCEL) is JobStatus.CANCELLED
