"""Events: facts in the past tense, stored in the EVENTS stream under `evt.<entity>.<id>.<kind>`."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, ClassVar

from pydantic import BaseModel, Field, TypeAdapter

from visionyard.shared import subjects
from visionyard.shared.messages import JobMessage, Message


class FailureReason(StrEnum):
    """Why a job failed; only `infrastructure` is retried automatically."""

    USER_ERROR = "user_error"
    TRAINER_CRASH = "trainer_crash"
    TIMEOUT = "timeout"
    STALLED = "stalled"
    INFRASTRUCTURE = "infrastructure"


class JobEvent(JobMessage):
    """Base of every job event; `kind` is the last token of its subject."""

    kind: ClassVar[str] = ""

    def subject(self) -> str:
        """The subject this event is published on."""
        return subjects.job_event(self.job_id, self.kind)


class JobQueued(JobEvent):
    """The API queued the job (written through the outbox together with `cmd.train`)."""

    kind: ClassVar[str] = "queued"


class JobCancelRequested(JobEvent):
    """A user asked to cancel; the runner holding the job stops it."""

    kind: ClassVar[str] = "cancel_requested"


class JobStarted(JobEvent):
    """A runner spawned the trainer for this attempt."""

    kind: ClassVar[str] = "started"

    runner_id: str
    pid: int | None = None
    dataset_hash: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    experiment_name: str = ""
    project_id: str = ""
    resumed_from_epoch: int | None = None


class ProgressReported(JobEvent):
    """One epoch (or step) of progress with its metrics."""

    kind: ClassVar[str] = "progress"

    epoch: int
    total_epochs: int
    step: int | None = None
    metrics: dict[str, float] = Field(default_factory=dict)


class LogEmitted(JobEvent):
    """A log line: from the SDK (`event_type` chosen by the trainer) or captured stdout/stderr."""

    kind: ClassVar[str] = "log"

    level: str = "INFO"
    event_type: str = "log"
    message: str
    data: dict[str, Any] | None = None


class CheckpointStaged(JobEvent):
    """A checkpoint file sits in the staging object store, waiting for storage to keep it."""

    kind: ClassVar[str] = "checkpoint"

    checkpoint_kind: str
    object_name: str
    sha256: str
    size_bytes: int
    epoch: int | None = None


class ArtifactStored(JobEvent):
    """Storage verified a staged artifact and wrote it to its bucket."""

    kind: ClassVar[str] = "artifact_stored"

    checkpoint_kind: str
    uri: str
    sha256: str
    size_bytes: int
    epoch: int | None = None


class JobCompleted(JobEvent):
    """The trainer exited 0. The job counts as completed once every declared checkpoint is stored."""

    kind: ClassVar[str] = "completed"

    total_epochs_completed: int = 0
    final_metrics: dict[str, float] = Field(default_factory=dict)
    best_metrics: dict[str, float] = Field(default_factory=dict)
    best_epoch: int | None = None
    declared_checkpoints: list[str] = Field(default_factory=list)


class JobFailed(JobEvent):
    """The attempt ended without success, with a classified reason."""

    kind: ClassVar[str] = "failed"

    reason: FailureReason
    error_message: str
    exit_code: int | None = None
    traceback: str | None = None
    retryable: bool = False


class JobCancelled(JobEvent):
    """The attempt was stopped on request; no process of it remains."""

    kind: ClassVar[str] = "cancelled"


class JobTracked(JobEvent):
    """The tracker holds an MLflow run for this job."""

    kind: ClassVar[str] = "tracked"

    run_id: str
    experiment_id: str


JOB_EVENT_TYPES: dict[str, type[JobEvent]] = {
    cls.kind: cls
    for cls in (
        JobQueued,
        JobCancelRequested,
        JobStarted,
        ProgressReported,
        LogEmitted,
        CheckpointStaged,
        ArtifactStored,
        JobCompleted,
        JobFailed,
        JobCancelled,
        JobTracked,
    )
}


def decode_job_event(subject: str, data: bytes) -> JobEvent:
    """Decode a job event from its subject kind; raises `ValueError` for an unknown kind."""
    kind = subjects.job_event_kind(subject)
    event_type = JOB_EVENT_TYPES.get(kind)
    if event_type is None:
        raise ValueError(f"unknown job event kind {kind!r} on {subject}")
    return event_type.model_validate_json(data)


class ClassStat(BaseModel):
    """Images per class."""

    name: str
    count: int


class DatasetEvent(Message):
    """Base of dataset events."""

    kind: ClassVar[str] = ""

    dataset_id: str

    def subject(self) -> str:
        """The subject this event is published on."""
        return subjects.dataset_event(self.dataset_id, self.kind)


class DatasetReady(DatasetEvent):
    """Storage accepted an upload and stored it as an immutable version keyed by its content hash."""

    kind: ClassVar[str] = "ready"

    content_hash: str
    format: str
    task_types: list[str] = Field(default_factory=list)
    num_images: int
    num_classes: int
    class_names: list[str]
    class_counts: dict[str, int] = Field(default_factory=dict)
    splits: dict[str, int] = Field(default_factory=dict)
    size_bytes: int
    uri: str


class DatasetRejected(DatasetEvent):
    """Storage refused an upload; `reason` says which file and what is wrong."""

    kind: ClassVar[str] = "rejected"

    reason: str


DATASET_EVENT_TYPES: dict[str, type[DatasetEvent]] = {
    cls.kind: cls for cls in (DatasetReady, DatasetRejected)
}


def decode_dataset_event(subject: str, data: bytes) -> DatasetEvent:
    """Decode a dataset event from its subject kind."""
    kind = subjects.job_event_kind(subject)
    event_type = DATASET_EVENT_TYPES.get(kind)
    if event_type is None:
        raise ValueError(f"unknown dataset event kind {kind!r} on {subject}")
    return event_type.model_validate_json(data)


# Request-reply payloads -------------------------------------------------------------------------


class StageRequest(BaseModel):
    """Runner → storage: put a stored file into the staging object store.

    Either a dataset version (`dataset_id` + `content_hash`) or a job's stored checkpoint
    (`job_id` + `checkpoint_kind`, used to resume a new attempt).
    """

    dataset_id: str | None = None
    content_hash: str | None = None
    job_id: str | None = None
    checkpoint_kind: str | None = None


class StageReply(BaseModel):
    """Storage → runner: where the staged file is, or why it could not be staged."""

    ok: bool
    object_name: str | None = None
    sha256: str | None = None
    size_bytes: int | None = None
    uri: str | None = None
    epoch: int | None = None
    error: str | None = None


class TrackerQuery(BaseModel):
    """API → tracker: metrics or summary of one job's MLflow run."""

    job_id: str


class PresignRequest(BaseModel):
    """API → storage: a download URL for a stored object."""

    uri: str
    expires_in: int = 3600


class PresignReply(BaseModel):
    """Storage → API."""

    ok: bool
    url: str | None = None
    error: str | None = None


ANY_JSON = TypeAdapter(dict[str, Any])
