"""Events: facts in the past tense, stored in the EVENTS stream under `evt.<entity>.<id>.<kind>`."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, ClassVar

from pydantic import Field

from visionyard.shared import subjects
from visionyard.shared.messages import JobMessage, Message, check_schema_version


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
    """The API queued an attempt (written through the outbox together with `cmd.train`).

    `status` is what the job shows while it waits: `queued` for a first start or a restart,
    `retrying` after an infrastructure loss, `resuming` for a resume from a stored checkpoint.
    """

    kind: ClassVar[str] = "queued"

    status: str = "queued"


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
    """Decode a job event from its subject kind; raises `ValueError` for an unknown kind, and its
    subclass `SchemaVersionError` for a schema major version this code does not read."""
    kind = subjects.job_event_kind(subject)
    event_type = JOB_EVENT_TYPES.get(kind)
    if event_type is None:
        check_schema_version(data)  # a kind of a newer major is refused for its version
        raise ValueError(f"unknown job event kind {kind!r} on {subject}")
    return event_type.from_bytes(data)


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
    num_annotations: int = 0


class DatasetRejected(DatasetEvent):
    """Storage refused an upload; `reason` says which file and what is wrong."""

    kind: ClassVar[str] = "rejected"

    reason: str


DATASET_EVENT_TYPES: dict[str, type[DatasetEvent]] = {
    cls.kind: cls for cls in (DatasetReady, DatasetRejected)
}


class DatasetDeleted(DatasetEvent):
    """Storage removed a deleted dataset's versions; `kept_hashes` stay because jobs pinned them."""

    kind: ClassVar[str] = "deleted"

    deleted_hashes: list[str] = Field(default_factory=list)
    kept_hashes: list[str] = Field(default_factory=list)


DATASET_EVENT_TYPES[DatasetDeleted.kind] = DatasetDeleted


def decode_dataset_event(subject: str, data: bytes) -> DatasetEvent:
    """Decode a dataset event from its subject kind (`ValueError`s as `decode_job_event`)."""
    kind = subjects.job_event_kind(subject)
    event_type = DATASET_EVENT_TYPES.get(kind)
    if event_type is None:
        check_schema_version(data)
        raise ValueError(f"unknown dataset event kind {kind!r} on {subject}")
    return event_type.from_bytes(data)


# Export and inference job events -----------------------------------------------------------------


class ExportInferenceEvent(JobMessage):
    """Base of export/inference job events (`job_id` is the export or inference id).

    They also carry the training job they ship, so the API can announce them on that job's feed.
    """

    family: ClassVar[str] = ""
    kind: ClassVar[str] = ""

    training_job_id: str

    def subject(self) -> str:
        """The subject this event is published on."""
        return subjects.export_inference_event(self.family, self.job_id, self.kind)


class _Started(ExportInferenceEvent):
    kind: ClassVar[str] = "started"

    runner_id: str
    pid: int | None = None


class _Progress(ExportInferenceEvent):
    kind: ClassVar[str] = "progress"

    message: str
    percent: float | None = None


class _Staged(ExportInferenceEvent):
    kind: ClassVar[str] = "staged"

    object_name: str
    sha256: str
    size_bytes: int


class _Stored(ExportInferenceEvent):
    kind: ClassVar[str] = "stored"

    uri: str
    sha256: str
    size_bytes: int


class _Completed(ExportInferenceEvent):
    kind: ClassVar[str] = "completed"

    results: dict[str, Any] = Field(default_factory=dict)


class _Failed(ExportInferenceEvent):
    kind: ClassVar[str] = "failed"

    reason: FailureReason
    error_message: str
    exit_code: int | None = None


class ExportStarted(_Started):
    """A runner spawned the exporter."""

    family: ClassVar[str] = subjects.Entity.EXPORT


class ExportProgress(_Progress):
    """A step of the export (exporting, validating, packaging)."""

    family: ClassVar[str] = subjects.Entity.EXPORT


class ExportPackageStaged(_Staged):
    """The package zip sits in the staging object store, waiting for storage to keep it."""

    family: ClassVar[str] = subjects.Entity.EXPORT


class ExportPackageStored(_Stored):
    """Storage verified the package and wrote it to `exports/<export_id>/package.zip`."""

    family: ClassVar[str] = subjects.Entity.EXPORT


class ExportCompleted(_Completed):
    """The exporter succeeded; `results` holds validation (passed, max_abs_diff) and metadata."""

    family: ClassVar[str] = subjects.Entity.EXPORT


class ExportFailed(_Failed):
    """The export failed, with a classified reason."""

    family: ClassVar[str] = subjects.Entity.EXPORT


class InferenceStarted(_Started):
    """A runner spawned the predictor."""

    family: ClassVar[str] = subjects.Entity.INFER


class InferenceProgress(_Progress):
    """Images classified so far."""

    family: ClassVar[str] = subjects.Entity.INFER


class InferenceResultsStaged(_Staged):
    """The per-image results JSON sits in the staging object store."""

    family: ClassVar[str] = subjects.Entity.INFER


class InferenceResultsStored(_Stored):
    """Storage wrote the results to `results/<inference_id>/results.json`."""

    family: ClassVar[str] = subjects.Entity.INFER


class InferenceCompleted(_Completed):
    """The predictor succeeded; `results` holds totals and timings, per-image rows are in the staged file."""

    family: ClassVar[str] = subjects.Entity.INFER

    results_object: str | None = None
    results_sha256: str | None = None


class InferenceFailed(_Failed):
    """The inference failed, with a classified reason."""

    family: ClassVar[str] = subjects.Entity.INFER


class _Cancelled(ExportInferenceEvent):
    kind: ClassVar[str] = "cancelled"


class ExportCancelled(_Cancelled):
    """The export was stopped on request (or skipped: cancelled before it started); no process of it remains."""

    family: ClassVar[str] = subjects.Entity.EXPORT


class InferenceCancelled(_Cancelled):
    """The inference was stopped on request (or skipped: cancelled before it started); no process of it remains."""

    family: ClassVar[str] = subjects.Entity.INFER


EXPORT_INFERENCE_EVENT_TYPES: dict[tuple[str, str], type[ExportInferenceEvent]] = {
    (cls.family, cls.kind): cls
    for cls in (
        ExportStarted, ExportProgress, ExportPackageStaged, ExportPackageStored, ExportCompleted, ExportFailed,
        ExportCancelled, InferenceStarted, InferenceProgress, InferenceResultsStaged, InferenceResultsStored,
        InferenceCompleted, InferenceFailed, InferenceCancelled,
    )
}


def decode_export_inference_event(subject: str, data: bytes) -> ExportInferenceEvent:
    """Decode an `evt.export.*` / `evt.infer.*` event (`ValueError`s as `decode_job_event`)."""
    event_type = EXPORT_INFERENCE_EVENT_TYPES.get((subjects.event_entity(subject), subjects.job_event_kind(subject)))
    if event_type is None:
        check_schema_version(data)
        raise ValueError(f"unknown export/inference event on {subject}")
    return event_type.from_bytes(data)


class ExportStatusChanged(JobEvent):
    """The API announces an export's status change on its training job's feed (for the WebSocket)."""

    kind: ClassVar[str] = "export_status"

    export_job_id: str
    old_status: str
    new_status: str


JOB_EVENT_TYPES[ExportStatusChanged.kind] = ExportStatusChanged
