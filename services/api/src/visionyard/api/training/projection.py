"""Projection of training job events onto the job's rows, idempotently.

Every event may arrive twice (redelivery) and events of a superseded attempt may arrive late, so each
use case is written as "already applied → skip": rows keyed by (job_id, attempt, seq), checkpoint rows
upserted by (job_id, kind) and never moved back to an older file (their staging's (attempt, seq) orders
them: an API killed mid-batch gets its in-flight events again after later ones), status moved only through
`jobstate`, and events of an attempt older than the job's are fenced off.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from visionyard.api import jobstate
from visionyard.api.db.models import Checkpoint, TrainingJob, utcnow
from visionyard.api.jobstate import JobOutcome
from visionyard.api.outbox.repository import OutboxRepository
from visionyard.api.training import attempts
from visionyard.api.training.repository import JobRepository, SeqKeyedRows
from visionyard.api.validation.projection import VALIDATION_EVENT, record_validation_images, split_image_results
from visionyard.shared.bus import PermanentError
from visionyard.shared.events import (
    ArtifactStored,
    CheckpointStaged,
    FailureReason,
    JobCancelled,
    JobCancelRequested,
    JobCompleted,
    JobEvent,
    JobFailed,
    JobQueued,
    JobStarted,
    JobTracked,
    LogEmitted,
    ProgressReported,
)
from visionyard.shared.messages import Message

log = logging.getLogger("visionyard.api.training.projection")


@dataclass(frozen=True)
class RetryPolicy:
    """How many attempts a job gets in all when its attempts are lost to infrastructure."""

    max_attempts: int = 3


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
            Checkpoint(job_id=job.id, kind=event.checkpoint_kind, attempt=event.attempt, seq=event.seq,
                       status="pending", staged_sha256=event.sha256, epoch=event.epoch, size_bytes=event.size_bytes)
        )
        return
    if row.status == "stored" and row.sha256 == event.sha256:
        return  # a redelivered staging of what is stored already
    if _older(event, row):
        # A staging redelivered after a newer file of its kind was staged or stored (its first delivery
        # died with an API process while later events went on): reopening the row would hide the newer file.
        return
    row.attempt = event.attempt
    row.seq = event.seq
    row.staged_sha256 = event.sha256
    row.status = "pending"


def store_checkpoint(jobs: JobRepository, job: TrainingJob, event: ArtifactStored) -> None:
    """Upsert the stored checkpoint and point the job's best/last path at it."""
    row = jobs.checkpoint(job.id, event.checkpoint_kind)
    if row is None:
        row = Checkpoint(job_id=job.id, kind=event.checkpoint_kind, attempt=event.attempt, seq=event.seq,
                         status="pending")
        jobs.add_checkpoint(row)
    elif row.status == "pending" and row.staged_sha256 not in (None, event.sha256):
        # A newer file of this kind is staged; an older one stored late must not satisfy it.
        log.info("stored checkpoint is older than the staged one", extra={"job_id": job.id})
        return
    elif row.sha256 != event.sha256 and _older(event, row):
        # A store redelivered after a newer file of its kind was stored must not replace it.
        log.info("stored checkpoint is older than the one on record", extra={"job_id": job.id})
        return
    row.uri = event.uri
    row.sha256 = event.sha256
    row.size_bytes = event.size_bytes
    row.epoch = event.epoch
    row.attempt = event.attempt
    row.seq = event.seq
    row.status = "stored"
    row.staged_sha256 = event.sha256
    if event.checkpoint_kind == "best":
        job.best_checkpoint_path = event.uri
    elif event.checkpoint_kind == "last":
        job.last_checkpoint_path = event.uri


def _older(event: CheckpointStaged | ArtifactStored, row: Checkpoint) -> bool:
    """Whether the event's file is older than the row's: staged by an earlier attempt, or earlier in the same one.

    A store carries its staging's seq, so (attempt, seq) orders both kinds of event; a row written before
    checkpoints kept their seq is ordered by attempt alone.
    """
    if event.attempt != row.attempt:
        return event.attempt < row.attempt
    return row.seq is not None and event.seq < row.seq


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
