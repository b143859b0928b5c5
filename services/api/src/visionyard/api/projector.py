"""Projection use cases: apply job and dataset events to the platform database, idempotently.

Every event may arrive twice (redelivery) and events of a superseded attempt may arrive late, so each
use case is written as "already applied → skip": rows keyed by (job_id, attempt, seq), checkpoint rows
upserted by (job_id, kind), status moved only through `jobstate`, and events of an attempt older than
the job's are fenced off.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.exc import StaleDataError

from visionyard.api import jobstate
from visionyard.api.db.models import Checkpoint, TrainingJob, utcnow
from visionyard.api.db.repositories import (
    OUTBOX_QUEUED,
    DatasetRepository,
    JobRepository,
    OutboxRepository,
    SeqKeyedRows,
)
from visionyard.api.jobstate import JobOutcome
from visionyard.api.training import attempts
from visionyard.shared.bus import PermanentError
from visionyard.shared.events import (
    ArtifactStored,
    CheckpointStaged,
    DatasetEvent,
    DatasetReady,
    DatasetRejected,
    JobCancelled,
    JobCancelRequested,
    JobCompleted,
    JobEvent,
    JobFailed,
    JobQueued,
    JobStarted,
    FailureReason,
    JobTracked,
    LogEmitted,
    ProgressReported,
)
from visionyard.shared.events import ShipEvent
from visionyard.shared.messages import Message
from visionyard.api.ship_projector import apply_ship_event
from visionyard.api.validation.projection import VALIDATION_EVENT, record_validation_images, split_image_results

log = logging.getLogger("visionyard.api.projector")

METRIC_COLUMNS = ("loss", "accuracy", "learning_rate")
# Times a batch is applied when a concurrent writer keeps winning the race on its job rows; then it is
# nak'ed like any transient failure.
STALE_BATCH_ATTEMPTS = 5

Token = TypeVar("Token")


@dataclass(frozen=True)
class RetryPolicy:
    """How many attempts a job gets in all when its attempts are lost to infrastructure."""

    max_attempts: int = 3


@dataclass(frozen=True)
class Rejected(Generic[Token]):
    """An event that can never be applied, with the reason (it is dead-lettered)."""

    token: Token
    reason: str


class Projector:
    """Applies batches of events, one transaction per batch (one savepoint per event if one is poison)."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        *,
        retry: RetryPolicy | None = None,
        after_commit: Callable[[], None] | None = None,
    ) -> None:
        self._session_factory = session_factory
        self._retry = retry or RetryPolicy()
        # Wakes the outbox relay: a projected event may have queued a retry or a terminal marker.
        self._after_commit = after_commit

    def apply_batch(self, events: Sequence[tuple[Token, Message]]) -> list[Rejected[Token]]:
        """Apply events in order in one transaction; returns those that are poison (not applied)."""
        for attempt in range(1, STALE_BATCH_ATTEMPTS + 1):
            try:
                return self._apply_batch_once(events)
            except StaleDataError:
                # Another writer (a callback or state-change endpoint, another replica's projector)
                # committed a job row this batch had read: the transaction rolled back whole, so the
                # batch is applied again on fresh rows (idempotent). Only PostgreSQL gets here; SQLite
                # writers are serialized by BEGIN IMMEDIATE. A nak instead would redeliver the batch
                # after later events of the same job (a progress point arriving after `completed`).
                if attempt == STALE_BATCH_ATTEMPTS:
                    raise
                log.info("job rows changed under a projection batch; applying it again (attempt %d)", attempt + 1)
        raise AssertionError("unreachable")

    def _apply_batch_once(self, events: Sequence[tuple[Token, Message]]) -> list[Rejected[Token]]:
        # Poison is rare: apply the batch without savepoints (a savepoint per event, and the flush
        # each one forces, cost more than the events themselves — profiled) and only when an event
        # turns out to be poison, roll back and apply the batch again isolating each event.
        try:
            with self._session_factory() as session, session.begin():
                batch = ProjectionBatch.load(session, [event for _token, event in events])
                for _token, event in events:
                    apply_event(session, event, retry=self._retry, batch=batch)
                batch.rows.write()
                queued = bool(session.info.pop(OUTBOX_QUEUED, False))
        except PermanentError:
            rejected = self._apply_isolated(events)
            queued = True
        else:
            rejected = []
        # Most batches (progress, logs) queue nothing: waking the relay for them cost a query per
        # batch (profiled: ~10 % of the API's CPU on a job reporting twice a second).
        if queued and self._after_commit is not None:
            self._after_commit()
        return rejected

    def _apply_isolated(self, events: Sequence[tuple[Token, Message]]) -> list[Rejected[Token]]:
        rejected: list[Rejected[Token]] = []
        with self._session_factory() as session, session.begin():
            batch = ProjectionBatch.load(session, [event for _token, event in events])
            for token, event in events:
                savepoint = session.begin_nested()
                try:
                    apply_event(session, event, retry=self._retry, batch=batch)
                    batch.rows.write()  # inside the event's savepoint: a poison event's rows go with it
                except PermanentError as error:
                    savepoint.rollback()
                    batch.rows.discard()
                    rejected.append(Rejected(token, str(error)))
                    continue
                savepoint.commit()
        return rejected


@dataclass(frozen=True)
class ProjectionBatch:
    """What the events of one transaction share: their jobs, and their metric and log rows.

    Both are read with one query each for the whole batch rather than one per event (profiled:
    the per-event statements were most of the projector's time); the rows are written together.
    """

    session: Session
    jobs: dict[str, TrainingJob]
    rows: SeqKeyedRows

    @classmethod
    def load(cls, session: Session, events: Sequence[Message]) -> ProjectionBatch:
        """Load the jobs the events name and which of their metric/log rows are applied already."""
        job_ids = {event.job_id for event in events if isinstance(event, JobEvent)}
        jobs = session.scalars(select(TrainingJob).where(TrainingJob.id.in_(job_ids))).all() if job_ids else []
        rows = SeqKeyedRows(session)
        rows.expect(
            metrics=[(e.job_id, e.attempt, e.seq) for e in events if isinstance(e, ProgressReported)],
            logs=[(e.job_id, e.attempt, e.seq) for e in events if isinstance(e, LogEmitted)],
        )
        return cls(session=session, jobs={job.id: job for job in jobs}, rows=rows)

    def job(self, job_id: str) -> TrainingJob | None:
        """The job, from the batch (or the database if the batch did not name it)."""
        job = self.jobs.get(job_id)
        if job is None:
            job = self.session.get(TrainingJob, job_id)
            if job is not None:
                self.jobs[job_id] = job
        return job


def apply_event(
    session: Session, event: Message, *, retry: RetryPolicy | None = None, batch: ProjectionBatch | None = None
) -> None:
    """Apply one event; raises PermanentError when it can never be applied.

    Within a `batch`, its metric or log row is added to `batch.rows`, which the caller writes
    before committing; without one the row is written before this returns.
    """
    if batch is None:
        batch = ProjectionBatch.load(session, [event])
        apply_event(session, event, retry=retry, batch=batch)
        batch.rows.write()
    elif isinstance(event, DatasetEvent):
        apply_dataset_event(session, event)
    elif isinstance(event, JobEvent):
        apply_job_event(session, event, retry=retry, batch=batch)
    elif isinstance(event, ShipEvent):
        apply_ship_event(session, event)
    else:
        raise PermanentError(f"no projection for {type(event).__name__}")


def apply_job_event(
    session: Session, event: JobEvent, *, batch: ProjectionBatch, retry: RetryPolicy | None = None
) -> None:
    """Project one job event onto the job's rows (its metric or log row goes to `batch.rows`)."""
    jobs = JobRepository(session)
    job = batch.job(event.job_id)
    if job is None:
        raise PermanentError(f"event for unknown job {event.job_id}")
    if fence_stale_attempt(job, event):
        return
    was_terminal = jobstate.is_terminal(job.status)
    outbox = OutboxRepository(session)
    if isinstance(event, JobStarted):
        if _move(job, JobOutcome.STARTED) and job.started_at is None:
            job.started_at = event.occurred_at
    elif isinstance(event, ProgressReported):
        record_progress(batch.rows, job, event)
    elif isinstance(event, LogEmitted):
        data, images = event.data, None
        if event.event_type == VALIDATION_EVENT:
            data, images = split_image_results(event.data)
        added = batch.rows.add_log_once(
            {
                "job_id": job.id, "attempt": event.attempt, "seq": event.seq, "level": event.level,
                "event_type": event.event_type, "message": event.message, "data": data,
                "created_at": event.occurred_at,
            }
        )
        epoch = (data or {}).get("epoch")
        if added and images is not None and isinstance(epoch, int):
            # Only with a new log row: a redelivered event keeps the rows (and the ids pages hold).
            record_validation_images(session, job_id=job.id, attempt=event.attempt, epoch=epoch, rows=images)
    elif isinstance(event, CheckpointStaged):
        declare_checkpoint(jobs, job, event)
    elif isinstance(event, ArtifactStored):
        store_checkpoint(jobs, job, event)
        complete_when_stored(jobs, job)
    elif isinstance(event, JobCompleted):
        record_completion(jobs, job, event)
    elif isinstance(event, JobFailed):
        if not retry_lost_attempt(jobs, outbox, job, event, policy=retry or RetryPolicy()) and _move(job, JobOutcome.FAILED):
            job.error_message = f"{event.reason.value}: {event.error_message}"
            job.completed_at = event.occurred_at
            job.completion = None
    elif isinstance(event, JobCancelled):
        if _move(job, JobOutcome.CANCELLED):
            job.completed_at = event.occurred_at
            job.completion = None
    elif isinstance(event, JobTracked):
        job.mlflow_run_id = event.run_id
    elif isinstance(event, (JobQueued, JobCancelRequested)):
        pass  # written by this API together with the state change it announces
    _raise_last_seq(job, event)
    if not was_terminal and jobstate.is_terminal(job.status):
        attempts.mark_terminal(outbox, job)


def retry_lost_attempt(
    jobs: JobRepository, outbox: OutboxRepository, job: TrainingJob, event: JobFailed, *, policy: RetryPolicy
) -> bool:
    """Queue the next attempt when infrastructure lost this one and attempts remain; whether it did.

    Only infrastructure losses are retried: a user error, a crash, a timeout or a stall would fail
    the same way again. The new attempt continues from the last stored checkpoint.
    """
    if not (event.retryable or event.reason is FailureReason.INFRASTRUCTURE):
        return False
    if job.attempt >= policy.max_attempts:
        return False
    target = jobstate.event_transition(job.status, JobOutcome.RETRY)
    if target is None:
        return False
    if target is not jobstate.JobStatus.RETRYING:
        job.status = target.value  # cancelling: the user's stop wins over a retry
        job.completed_at = event.occurred_at
        return True
    resume_from = attempts.last_stored_checkpoint(jobs, job)
    log.info("retrying a job after an infrastructure failure", extra={"job_id": job.id, "attempt": job.attempt})
    attempts.begin_new_attempt(job)
    job.status = target.value
    job.error_message = f"retrying after {event.reason.value}: {event.error_message}"
    attempts.queue_attempt(outbox, job, resume_from=resume_from)
    return True


def fence_stale_attempt(job: TrainingJob, event: JobEvent) -> bool:
    """Whether to ignore the event (older attempt); a newer attempt (failover) takes the job over."""
    if event.attempt < job.attempt:
        log.info("ignoring event of a superseded attempt", extra={"job_id": job.id, "attempt": event.attempt})
        return True
    if event.attempt > job.attempt:
        if not jobstate.may_take_over(job.status):
            # Only the API reopens a finished job (restart/resume/retry issue their own attempt):
            # a late event or a redelivered command of a finished job must not "recover" it.
            log.info("ignoring a newer attempt of a finished job", extra={"job_id": job.id, "attempt": event.attempt})
            return True
        # Another runner took over after a failover: the job now follows the newer attempt.
        job.attempt = event.attempt
        job.last_seq = 0
        job.completion = None
    return False


def record_progress(rows: SeqKeyedRows, job: TrainingJob, event: ProgressReported) -> None:
    """Add the metric row and, unless an older report arrives late, move the job's progress."""
    metrics = dict(event.metrics)
    inserted = rows.add_metric_once(
        {
            "job_id": job.id, "attempt": event.attempt, "seq": event.seq, "epoch": event.epoch,
            "step": event.step, "loss": metrics.pop("loss", None), "accuracy": metrics.pop("accuracy", None),
            "learning_rate": metrics.pop("learning_rate", None), "extra_metrics": metrics,
            "checkpoint_path": job.last_checkpoint_path, "created_at": event.occurred_at,
        }
    )
    if not inserted or event.seq < job.last_seq:
        return
    if jobstate.is_terminal(job.status):
        return
    job.current_epoch = event.epoch
    total = event.total_epochs or job.epochs
    job.progress_percent = round(min(100.0, 100.0 * event.epoch / total), 2) if total else 0.0
    # Progress proves the attempt runs even if its `started` event is late.
    if _move(job, JobOutcome.STARTED) and job.started_at is None:
        job.started_at = event.occurred_at


def declare_checkpoint(jobs: JobRepository, job: TrainingJob, event: CheckpointStaged) -> None:
    """Record that a checkpoint kind is on its way to storage (pending until stored)."""
    row = jobs.checkpoint(job.id, event.checkpoint_kind)
    if row is None:
        jobs.add_checkpoint(
            Checkpoint(job_id=job.id, kind=event.checkpoint_kind, attempt=event.attempt, status="pending",
                       staged_sha256=event.sha256, epoch=event.epoch, size_bytes=event.size_bytes)
        )
        return
    if row.status == "stored" and row.sha256 == event.sha256:
        return  # a redelivered staging of what is stored already
    row.attempt = event.attempt
    row.staged_sha256 = event.sha256
    row.status = "pending"


def store_checkpoint(jobs: JobRepository, job: TrainingJob, event: ArtifactStored) -> None:
    """Upsert the stored checkpoint and point the job's best/last path at it."""
    row = jobs.checkpoint(job.id, event.checkpoint_kind)
    if row is None:
        row = Checkpoint(job_id=job.id, kind=event.checkpoint_kind, attempt=event.attempt, status="pending")
        jobs.add_checkpoint(row)
    elif row.status == "pending" and row.staged_sha256 not in (None, event.sha256):
        # A newer file of this kind is staged; an older one stored late must not satisfy it.
        log.info("stored checkpoint is older than the staged one", extra={"job_id": job.id})
        return
    row.uri = event.uri
    row.sha256 = event.sha256
    row.size_bytes = event.size_bytes
    row.epoch = event.epoch
    row.attempt = event.attempt
    row.status = "stored"
    row.staged_sha256 = event.sha256
    if event.checkpoint_kind == "best":
        job.best_checkpoint_path = event.uri
    elif event.checkpoint_kind == "last":
        job.last_checkpoint_path = event.uri


def record_completion(jobs: JobRepository, job: TrainingJob, event: JobCompleted) -> None:
    """Note the trainer's success; the job completes once every declared checkpoint is stored."""
    if jobstate.is_terminal(job.status):
        return
    # When accuracy is what the job optimizes, report its best value; otherwise the final one.
    if job.primary_metric == "accuracy":
        job.final_accuracy = _first_present(event.best_metrics, event.final_metrics, key="accuracy")
    else:
        job.final_accuracy = _first_present(event.final_metrics, event.best_metrics, key="accuracy")
    job.current_epoch = max(job.current_epoch, event.total_epochs_completed)
    job.completion = {
        "declared": sorted(set(event.declared_checkpoints)),
        "completed_at": event.occurred_at.isoformat(),
    }
    complete_when_stored(jobs, job)


def complete_when_stored(jobs: JobRepository, job: TrainingJob) -> None:
    """Complete the job if the trainer finished and every declared checkpoint is stored."""
    if job.completion is None:
        return
    declared = set(job.completion.get("declared", []))
    checkpoints = {row.kind: row for row in jobs.checkpoints(job.id)}
    # Kinds staged by this attempt count as declared even if the completion event omits them.
    declared |= {kind for kind, row in checkpoints.items() if row.attempt == job.attempt and row.status == "pending"}
    if any(kind not in checkpoints or checkpoints[kind].status != "stored" for kind in declared):
        return
    if _move(job, JobOutcome.COMPLETED):
        job.progress_percent = 100.0
        job.completed_at = utcnow()
        job.completion = None


def apply_dataset_event(session: Session, event: DatasetEvent) -> None:
    """Project a storage verdict on an upload onto the dataset row."""
    datasets = DatasetRepository(session)
    dataset = datasets.get(event.dataset_id)
    if dataset is None:
        log.info("dataset event for a deleted or unknown dataset", extra={"dataset_id": event.dataset_id})
        return
    if isinstance(event, DatasetReady):
        stats = event.model_dump(mode="json", exclude={"message_id", "occurred_at", "version", "dataset_id"})
        datasets.add_version_once(dataset_id=dataset.id, content_hash=event.content_hash, stats=stats)
        dataset.status = "ready"
        dataset.content_hash = event.content_hash
        dataset.format = event.format
        dataset.num_images = event.num_images
        dataset.num_classes = event.num_classes
        dataset.class_names = list(event.class_names)
        dataset.class_counts = dict(event.class_counts)
        dataset.splits = dict(event.splits)
        dataset.task_types = list(event.task_types)
        dataset.size_bytes = event.size_bytes
        dataset.uri = event.uri
        dataset.labeled = event.num_classes > 0
        dataset.rejection_reason = None
    elif isinstance(event, DatasetRejected):
        dataset.rejection_reason = event.reason
        # A rejected re-upload leaves the current version usable.
        dataset.status = "ready" if dataset.content_hash else "rejected"


def _move(job: TrainingJob, outcome: JobOutcome) -> bool:
    target = jobstate.event_transition(job.status, outcome)
    if target is None:
        return False
    job.status = target.value
    return True


def _raise_last_seq(job: TrainingJob, event: JobEvent) -> None:
    if event.attempt == job.attempt and event.seq > job.last_seq:
        job.last_seq = event.seq


def _first_present(*sources: dict[str, float], key: str) -> float | None:
    for source in sources:
        if key in source:
            return float(source[key])
    return None
