"""Queueing a job attempt: the one place that turns a job row into a queue request written to the outbox.

Both a user's start/restart/resume (training service) and the platform's automatic retry after an
infrastructure failure (projector) queue attempts, so both go through here: the new attempt number,
the queue request (KV `sched_requests`, holding the attempt's `StartTraining`) and its `queued` event
are written in the caller's transaction. The elected scheduler admits the request when its turn comes
and only then publishes the command to the runners (docs/scheduling.md).
"""

from __future__ import annotations

import uuid

from visionyard.api.datasets.versions import split_for_version
from visionyard.api.db.models import TrainingJob, utcnow
from visionyard.api.errors import Conflict, InvalidInput
from visionyard.api.outbox.repository import OutboxRepository
from visionyard.api.training.repository import JobRepository
from visionyard.shared import streams, tracing
from visionyard.shared.commands import CheckpointRef, DatasetRef, StartTraining, TrainingConfig
from visionyard.shared.devices import device_request
from visionyard.shared.events import JobQueued
from visionyard.shared.scheduling import QueueRequest


def begin_new_attempt(job: TrainingJob) -> None:
    """Reset the projection of the current attempt and number the next one."""
    job.attempt += 1
    job.last_seq = 0
    job.ingress_seq = 0
    job.error_message = None
    job.current_epoch = 0
    job.progress_percent = 0.0
    job.final_accuracy = None
    job.started_at = None
    job.completed_at = None
    job.completion = None


def last_stored_checkpoint(jobs: JobRepository, job: TrainingJob) -> CheckpointRef | None:
    """The checkpoint a new attempt continues from (`last`, else `best`, else any), or None."""
    stored = {row.kind: row for row in jobs.checkpoints(job.id) if row.status == "stored" and row.uri and row.sha256}
    for kind in ("last", "best", *sorted(stored)):
        row = stored.get(kind)
        if row is not None and row.uri is not None and row.sha256 is not None:
            return CheckpointRef(kind=row.kind, uri=row.uri, sha256=row.sha256, epoch=row.epoch)
    return None


def require_checkpoint(jobs: JobRepository, job: TrainingJob, *, uri: str | None = None) -> CheckpointRef:
    """The checkpoint to resume from (the one stored at `uri` when given); Conflict when the job has none."""
    if uri:
        for row in jobs.checkpoints(job.id):
            if row.status == "stored" and row.uri == uri and row.sha256:
                return CheckpointRef(kind=row.kind, uri=row.uri, sha256=row.sha256, epoch=row.epoch)
        raise InvalidInput("checkpoint_path", f"{uri} is not a stored checkpoint of job {job.id}")
    found = last_stored_checkpoint(jobs, job)
    if found is None:
        raise Conflict(f"cannot resume job {job.id}: no stored checkpoint")
    return found


def training_config(job: TrainingJob) -> TrainingConfig:
    """The job's training configuration as the runner receives it."""
    return TrainingConfig(
        framework=job.framework, model_name=job.model_name, task_type=job.task_type, num_classes=job.num_classes,
        dataset_id=job.dataset_id, dataset_format=job.dataset_format, epochs=job.epochs, batch_size=job.batch_size,
        learning_rate=job.learning_rate, advanced_config=job.advanced_config, primary_metric=job.primary_metric,
        primary_metric_mode=job.primary_metric_mode,  # type: ignore[arg-type]
    )


def queue_attempt(outbox: OutboxRepository, job: TrainingJob, *, resume_from: CheckpointRef | None) -> None:
    """Write the queue request of the job's current attempt (with its `StartTraining`) and its `queued` event."""
    job.queued_at = utcnow()
    command = StartTraining(
        # One id per attempt: the scheduler's publish of it is de-duplicated whoever sends it (scheduler.py).
        message_id=f"train-{job.id}-{job.attempt}",
        job_id=job.id,
        attempt=job.attempt,
        project_id=job.project_id,
        experiment_name=job.experiment_name,
        config=training_config(job),
        dataset=DatasetRef(
            dataset_id=job.dataset_id, content_hash=job.dataset_snapshot_id,
            split=split_for_version(outbox.session, dataset_id=job.dataset_id, content_hash=job.dataset_snapshot_id),
        ),
        resume_from=resume_from,
    )
    request = QueueRequest(
        job_id=job.id, attempt=job.attempt, project_id=job.project_id, priority=job.priority,
        queued_at=job.queued_at.timestamp(), gpus=device_request(job.advanced_config).gpus, command=command,
        trace=tracing.inject() if tracing.enabled() else {},
    )
    put_request(outbox, request, message_id=f"queue-{job.id}-{job.attempt}")
    outbox.add(JobQueued(job_id=job.id, attempt=job.attempt, status=job.status))


def put_request(outbox: OutboxRepository, request: QueueRequest, *, message_id: str | None = None) -> None:
    """Write a queue request into `sched_requests` through the outbox (a new one, or its priority changed)."""
    outbox.add_kv_put(bucket=streams.KV_SCHED_REQUESTS, key=request.job_id, value=request.model_dump(mode="json"),
                      message_id=message_id or f"queue-{request.job_id}-{request.attempt}-{uuid.uuid4().hex}")


def mark_terminal(outbox: OutboxRepository, job: TrainingJob) -> None:
    """Record durably (KV `job_terminal`) that the job's current attempt is finished.

    A runner that later receives a redelivered command of this attempt acks it instead of running
    it again, so a finished job is never "recovered".
    """
    outbox.add_kv_put(
        bucket=streams.KV_JOB_TERMINAL,
        key=job.id,
        value={"attempt": job.attempt, "status": job.status},
        message_id=f"terminal-{job.id}-{job.attempt}",
    )
