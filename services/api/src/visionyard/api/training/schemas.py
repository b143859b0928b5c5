"""Wire schemas of the training routes (API.md field names)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from visionyard.shared.commands import TrainingConfig
from visionyard.shared.scheduling import NORMAL_PRIORITY, parse_priority, priority_name

PRIORITY_HELP = "low, normal, high, or an integer from -1000 to 1000 (higher starts first; low 0, normal 50, high 100)"


class CreateJobRequest(BaseModel):
    """Body of `POST /training/jobs`; `config` follows the TrainingConfig bounds."""

    model_config = ConfigDict(extra="forbid")

    project_id: int | None = Field(default=None, ge=1, description="default: the caller's own Uncategorized project")
    experiment_name: str | None = Field(default=None, min_length=1, max_length=256)
    tags: list[str] = Field(default_factory=list)
    notes: str | None = None
    priority: int | str = Field(default=NORMAL_PRIORITY, description=PRIORITY_HELP)
    config: TrainingConfig

    @field_validator("priority", mode="before")
    @classmethod
    def _priority(cls, value: Any) -> int:
        return parse_priority(value)


class PriorityRequest(BaseModel):
    """Body of `PATCH /training/jobs/{id}/priority`."""

    model_config = ConfigDict(extra="forbid")

    priority: int | str = Field(description=PRIORITY_HELP)

    @field_validator("priority", mode="before")
    @classmethod
    def _priority(cls, value: Any) -> int:
        return parse_priority(value)


class QueuePosition(BaseModel):
    """Where a waiting job stands, as the scheduler last reported it."""

    position: int = Field(description="1: the next job to start; 0: already handed to the runners")
    jobs_ahead: int = Field(description="waiting jobs that will start before it")
    reason: str = Field(description="priority | capacity | quota | no_device | no_runner | dispatching")
    detail: str
    queue: str = Field(description="cpu, or gpu-<count>")
    estimated_start_seconds: float | None = Field(description="from the recent start rate; null when none can be made")
    estimated_start_at: datetime | None
    updated_at: datetime = Field(description="when the scheduler computed this")
    stale: bool = Field(description="no scheduler has reported for a while: the figures may be old")


class TrainingJobResponse(BaseModel):
    """A training job as the frontend reads it."""

    model_config = ConfigDict(from_attributes=True, protected_namespaces=())

    id: int
    project_id: int
    project_name: str | None = None
    experiment_name: str
    tags: list[str] = Field(default_factory=list)
    notes: str | None = None
    framework: str
    model_name: str
    task_type: str
    num_classes: int | None
    dataset_id: str
    dataset_snapshot_id: str
    dataset_format: str | None
    epochs: int
    batch_size: int
    learning_rate: float
    advanced_config: dict[str, Any] | None
    status: str
    error_message: str | None
    current_epoch: int
    progress_percent: float
    final_accuracy: float | None
    best_checkpoint_path: str | None
    last_checkpoint_path: str | None
    primary_metric: str
    primary_metric_mode: str
    mlflow_run_id: str | None
    attempt: int
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    priority: int = NORMAL_PRIORITY
    priority_name: str | None = Field(default=None, description="low, normal or high when the priority is one of them")
    queued_at: datetime | None = None
    queue: QueuePosition | None = Field(default=None, description="a waiting job's place in the queue (GET /jobs/{id})")

    @model_validator(mode="after")
    def _name_priority(self) -> TrainingJobResponse:
        self.priority_name = priority_name(self.priority)
        return self


class JobListResponse(BaseModel):
    """A page of jobs."""

    jobs: list[TrainingJobResponse]
    total: int
    limit: int
    offset: int


class MetricResponse(BaseModel):
    """One metric row."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    epoch: int
    step: int | None
    loss: float | None
    accuracy: float | None
    learning_rate: float | None
    extra_metrics: dict[str, Any]
    checkpoint_path: str | None
    created_at: datetime
    attempt: int


class JobStatusResponse(BaseModel):
    """A job and its latest metrics."""

    job: TrainingJobResponse
    latest_metrics: list[MetricResponse]


class MetricSchemaResponse(BaseModel):
    """Which metrics a job reports."""

    job_id: int
    framework: str
    task_type: str
    primary_metric: str
    primary_metric_mode: str
    available_metrics: list[str]
    metric_count: int


class LogResponse(BaseModel):
    """One log line: `log_type` and `content` as the original frontend reads them, and the event's own fields."""

    id: int
    log_type: str = Field(description="stdout or stderr for captured output, else the event type")
    content: str
    attempt: int
    seq: int
    level: str
    event_type: str
    message: str
    data: dict[str, Any] | None
    created_at: datetime

    @classmethod
    def from_row(cls, row: Any) -> LogResponse:
        """A log row as the frontend reads it."""
        return cls(id=row.id, log_type=row.event_type, content=row.message or "", attempt=row.attempt, seq=row.seq,
                   level=row.level, event_type=row.event_type, message=row.message or "", data=row.data,
                   created_at=row.created_at)


class CheckpointResponse(BaseModel):
    """A stored checkpoint."""

    model_config = ConfigDict(from_attributes=True)

    kind: str
    uri: str
    sha256: str
    size_bytes: int | None
    epoch: int | None


class CheckpointsResponse(BaseModel):
    """A job's stored checkpoints."""

    checkpoints: list[CheckpointResponse]
