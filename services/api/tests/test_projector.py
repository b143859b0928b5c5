"""Projection use cases on a real (migrated) SQLite and PostgreSQL database: idempotent, fenced, completion-gated.

The database comes from conftest's `session_factory`, which parametrises every test over both kinds.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import event, func, select, text
from sqlalchemy.orm import Session, sessionmaker

from visionyard.api.db.migrate import upgrade_to_head
from visionyard.api.db.models import (
    Checkpoint,
    Dataset,
    DatasetVersion,
    TrainingJob,
    TrainingLog,
    TrainingMetric,
    utcnow,
)
from visionyard.api.db.session import make_session_factory
from visionyard.api.projector import Projector
from visionyard.api.training.repository import SeqKeyedRows
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

from .pgschema import fresh_postgres_schema


def _seed(
    session_factory: sessionmaker[Session], *, status: str = "queued", attempt: int = 1,
    job_ids: tuple[str, ...] = ("j1",),
) -> None:
    with session_factory() as session, session.begin():
        session.add(Dataset(id="d1", name="digits", status="ready", content_hash="h1", class_names=[], class_counts={},
                            splits={}, task_types=[]))
        for job_id in job_ids:
            session.add(TrainingJob(
                id=job_id, project_id="default", experiment_name="visionyard-default", tags=[], framework="pytorch",
                model_name="simple_cnn", task_type="image_classification", dataset_id="d1", dataset_snapshot_id="h1",
                epochs=2, batch_size=8, learning_rate=0.01, primary_metric="accuracy", primary_metric_mode="max",
                status=status, attempt=attempt,
            ))


def _apply(projector: Projector, *events: Message) -> list:
    return projector.apply_batch([(index, event) for index, event in enumerate(events)])


def _job(session_factory: sessionmaker[Session], job_id: str = "j1") -> TrainingJob:
    with session_factory() as session:
        job = session.get(TrainingJob, job_id)
        assert job is not None
        return job


def _count(session_factory: sessionmaker[Session], model: type) -> int:
    with session_factory() as session:
        return session.scalar(select(func.count()).select_from(model)) or 0


def _staged(kind: str, seq: int, sha: str = "a" * 64, *, epoch: int = 2) -> CheckpointStaged:
    return CheckpointStaged(job_id="j1", attempt=1, seq=seq, checkpoint_kind=kind, object_name=f"ckpt/j1/1/{seq}-{kind}.pt",
                            sha256=sha, size_bytes=10, epoch=epoch)


def _stored(kind: str, seq: int, sha: str = "a" * 64, *, epoch: int = 2) -> ArtifactStored:
    return ArtifactStored(job_id="j1", attempt=1, seq=seq, checkpoint_kind=kind, uri=f"file:///ckpt/j1/{kind}-{epoch}.pt",
                          sha256=sha, size_bytes=10, epoch=epoch)


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
    assert job.best_checkpoint_path == "file:///ckpt/j1/best-2.pt"
    _apply(projector, _stored("last", 6))
    job = _job(session_factory)
    assert job.status == "completed" and job.completed_at is not None
    assert job.last_checkpoint_path == "file:///ckpt/j1/last-2.pt"
    with session_factory() as session:
        kinds = {(c.kind, c.status) for c in session.scalars(select(Checkpoint))}
    assert kinds == {("best", "stored"), ("last", "stored")}


def test_checkpoints_staged_stored_and_completed_in_one_batch_complete_the_job(
    session_factory: sessionmaker[Session],
) -> None:
    # The checkpoint look-ups do not autoflush: the stored status set earlier in the same batch must be
    # seen through the session, and a staging redelivered after its store must not reopen it.
    _seed(session_factory, status="running")
    projector = Projector(session_factory)
    completed = JobCompleted(job_id="j1", attempt=1, seq=9, total_epochs_completed=2, final_metrics={},
                             best_metrics={}, declared_checkpoints=["best", "last"])
    _apply(projector, _staged("best", 5), _stored("best", 5), _staged("last", 6), _stored("last", 6),
           _staged("best", 5), completed)
    job = _job(session_factory)
    assert job.status == "completed" and job.completed_at is not None
    assert (job.best_checkpoint_path, job.last_checkpoint_path) == ("file:///ckpt/j1/best-2.pt", "file:///ckpt/j1/last-2.pt")


def test_a_checkpoint_staged_or_stored_again_after_a_newer_one_of_its_kind_changes_nothing(
    session_factory: sessionmaker[Session],
) -> None:
    # An API killed mid-batch: epoch 2's staging and store come again (after the ack wait) once epoch 3's
    # checkpoint is stored and the job completed. They must neither reopen `last` nor put epoch 2 back.
    _seed(session_factory, status="running")
    projector = Projector(session_factory)
    completed = JobCompleted(job_id="j1", attempt=1, seq=9, total_epochs_completed=3, final_metrics={},
                             best_metrics={}, declared_checkpoints=["last"])
    _apply(projector, _staged("last", 4, "2" * 64, epoch=2), _stored("last", 4, "2" * 64, epoch=2),
           _staged("last", 6, "3" * 64, epoch=3), _stored("last", 6, "3" * 64, epoch=3), completed)
    _apply(projector, _staged("last", 4, "2" * 64, epoch=2))
    _apply(projector, _stored("last", 4, "2" * 64, epoch=2))
    job = _job(session_factory)
    assert job.status == "completed"
    assert job.last_checkpoint_path == "file:///ckpt/j1/last-3.pt"
    with session_factory() as session:
        rows = [(c.kind, c.status, c.epoch, c.sha256) for c in session.scalars(select(Checkpoint))]
    assert rows == [("last", "stored", 3, "3" * 64)]


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


def _progress(seq: int, epoch: int, *, job_id: str = "j1", attempt: int = 1) -> ProgressReported:
    return ProgressReported(job_id=job_id, attempt=attempt, seq=seq, epoch=epoch, total_epochs=10,
                            metrics={"loss": 1.0 / seq})


def _metric_keys(session_factory: sessionmaker[Session]) -> list[tuple[str, int, int, int]]:
    with session_factory() as session:
        rows = session.scalars(select(TrainingMetric).order_by(TrainingMetric.job_id, TrainingMetric.attempt,
                                                               TrainingMetric.seq))
        return [(row.job_id, row.attempt, row.seq, row.epoch) for row in rows]


def test_duplicates_inside_a_batch_and_from_earlier_batches_are_applied_once(
    session_factory: sessionmaker[Session],
) -> None:
    _seed(session_factory)
    projector = Projector(session_factory)
    assert _apply(projector, _progress(2, 1), _progress(3, 2)) == []
    log = LogEmitted(job_id="j1", attempt=1, seq=5, message="epoch 3 done", event_type="stdout")
    late = _progress(4, 3)
    # Redelivered from the first batch (3, 2), twice in this one (4, the log), and an old one out of order (2).
    assert _apply(projector, _progress(3, 2), late, late, log, log, _progress(2, 1), _progress(6, 4)) == []
    assert _metric_keys(session_factory) == [("j1", 1, 2, 1), ("j1", 1, 3, 2), ("j1", 1, 4, 3), ("j1", 1, 6, 4)]
    assert _count(session_factory, TrainingLog) == 1
    job = _job(session_factory)
    assert (job.current_epoch, job.last_seq, job.status) == (4, 6, "running")
    _apply(projector, _progress(3, 2), log, _progress(6, 4))  # the whole batch again: nothing changes
    assert len(_metric_keys(session_factory)) == 4
    assert _count(session_factory, TrainingLog) == 1
    assert (_job(session_factory).current_epoch, _job(session_factory).last_seq) == (4, 6)


def test_events_of_several_jobs_and_attempts_sharing_seqs_in_one_batch_each_get_their_rows(
    session_factory: sessionmaker[Session],
) -> None:
    _seed(session_factory, status="running", job_ids=("j1", "j2"))
    projector = Projector(session_factory)
    _apply(projector, _progress(1, 1), _progress(2, 2))
    # j2 uses j1's seqs; attempt 2 of j1 (a failover) starts its seqs again and takes over; a late
    # event of attempt 1 after that is fenced off.
    _apply(projector, _progress(1, 1, job_id="j2"), _progress(2, 2, job_id="j2"),
           _progress(1, 1, attempt=2), _progress(2, 1, attempt=1), _progress(2, 2, attempt=2))
    assert _metric_keys(session_factory) == [
        ("j1", 1, 1, 1), ("j1", 1, 2, 2), ("j1", 2, 1, 1), ("j1", 2, 2, 2), ("j2", 1, 1, 1), ("j2", 1, 2, 2),
    ]
    job = _job(session_factory)
    assert (job.attempt, job.current_epoch, job.last_seq) == (2, 2, 2)
    assert _job(session_factory, "j2").current_epoch == 2


def test_a_poison_event_in_the_middle_of_a_batch_is_rejected_and_the_rest_applied(
    session_factory: sessionmaker[Session],
) -> None:
    _seed(session_factory)
    projector = Projector(session_factory)
    log = LogEmitted(job_id="j1", attempt=1, seq=5, message="after the poison", event_type="stdout")
    rejected = _apply(
        projector,
        _progress(2, 1), _progress(3, 2),
        _progress(4, 9, job_id="nope"),  # poison: no such job
        _progress(3, 2), log, _progress(6, 3),
    )
    assert [(r.token, "unknown job" in r.reason) for r in rejected] == [(2, True)]
    assert _metric_keys(session_factory) == [("j1", 1, 2, 1), ("j1", 1, 3, 2), ("j1", 1, 6, 3)]
    assert _count(session_factory, TrainingLog) == 1
    job = _job(session_factory)
    assert (job.status, job.current_epoch, job.last_seq) == ("running", 3, 6)
    # Redelivered, the batch changes nothing more and the poison is rejected again.
    assert [r.token for r in _apply(projector, _progress(2, 1), _progress(4, 9, job_id="nope"), log)] == [1]
    assert len(_metric_keys(session_factory)) == 3
    assert _count(session_factory, TrainingLog) == 1


def test_batch_rows_know_what_is_applied_and_forget_what_is_rolled_back(session_factory: sessionmaker[Session]) -> None:
    _seed(session_factory)
    Projector(session_factory).apply_batch([(0, _progress(2, 1)), (1, _progress(9, 2))])

    def row(seq: int) -> dict[str, object]:
        return {"job_id": "j1", "attempt": 1, "seq": seq, "epoch": seq, "step": None, "loss": None, "accuracy": None,
                "learning_rate": None, "extra_metrics": {}, "checkpoint_path": None, "created_at": utcnow()}

    with session_factory() as session, session.begin():
        rows = SeqKeyedRows(session)
        rows.expect(metrics=[("j1", 1, 3), ("j1", 1, 4)])
        assert rows.add_metric_once(row(3)) is True
        assert rows.add_metric_once(row(3)) is False  # the same event twice in the batch
        assert rows.add_metric_once(row(2)) is False  # stored by an earlier batch, outside the expected range
        assert rows.add_metric_once(row(9)) is False
        rows.write()
        assert rows.add_metric_once(row(4)) is True
        rows.discard()  # its event was rolled back: not written, and no longer counted as applied
        assert rows.add_metric_once(row(5)) is True
        rows.write()
        assert rows.add_metric_once(row(4)) is True
        rows.write()
    assert [seq for _job_id, _attempt, seq, _epoch in _metric_keys(session_factory)] == [2, 3, 4, 5, 9]


def test_the_outbox_relay_is_woken_only_by_batches_that_queued_messages(session_factory: sessionmaker[Session]) -> None:
    _seed(session_factory, status="running")
    wakes: list[int] = []
    projector = Projector(session_factory, after_commit=lambda: wakes.append(1))
    _apply(projector, ProgressReported(job_id="j1", attempt=1, seq=1, epoch=1, total_epochs=2, metrics={"loss": 1.0}),
           LogEmitted(job_id="j1", attempt=1, seq=2, message="hello"))
    assert wakes == []  # progress and logs queue nothing to publish
    _apply(projector, JobCompleted(job_id="j1", attempt=1, seq=3, total_epochs_completed=2))
    assert _job(session_factory).status == "completed"
    assert wakes == [1]  # the terminal marker waits in the outbox


@pytest.mark.postgresql
def test_a_batch_that_loses_the_race_on_its_job_row_is_applied_again_on_postgresql() -> None:
    # PostgreSQL lets an endpoint (a callback bumping `ingress_seq`) commit a job row the projector has
    # read; the batch must then be applied on the fresh row, not nak'ed and redelivered after later events.
    with fresh_postgres_schema() as (engine, _schema):
        upgrade_to_head(engine)
        session_factory = make_session_factory(engine)
        _seed(session_factory, status="running")
        races: list[int] = []

        def racing_factory(**options: Any) -> Session:
            session = session_factory(**options)
            if not races:
                @event.listens_for(session, "before_flush")
                def _endpoint_commits_first(*_args: Any) -> None:
                    if not races:
                        races.append(1)
                        with engine.begin() as other:
                            other.execute(text("UPDATE training_jobs SET ingress_seq = ingress_seq + 1, "
                                               "row_version = row_version + 1 WHERE id = 'j1'"))
            return session

        assert _apply(Projector(racing_factory), _progress(2, 1)) == []  # type: ignore[arg-type]
        assert races == [1]
        assert _metric_keys(session_factory) == [("j1", 1, 2, 1)]
        job = _job(session_factory)
        assert (job.current_epoch, job.last_seq, job.ingress_seq) == (1, 2, 1)
