"""Commands: imperative requests for work, stored in the COMMANDS work-queue stream."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from visionyard.shared import subjects
from visionyard.shared.messages import JobMessage, Message


class TrainingConfig(BaseModel):
    """What to train; validated by the API, read by the runner and handed to the trainer."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    framework: str = Field(min_length=1)
    model_name: str = Field(min_length=1)
    task_type: str = Field(min_length=1)
    num_classes: int | None = Field(default=None, ge=2)
    dataset_id: str = Field(min_length=1)
    dataset_format: str | None = None
    epochs: int = Field(default=50, ge=1, le=1000)
    batch_size: int = Field(default=32, ge=1, le=512)
    learning_rate: float = Field(default=0.001, gt=0, lt=1)
    advanced_config: dict[str, Any] | None = None
    primary_metric: str | None = None
    primary_metric_mode: Literal["max", "min"] | None = None


class DatasetRef(BaseModel):
    """A pinned, immutable dataset version: the runner stages exactly this content hash."""

    dataset_id: str
    content_hash: str


class CheckpointRef(BaseModel):
    """A stored checkpoint a new attempt resumes from."""

    kind: str
    uri: str
    sha256: str
    epoch: int | None = None


class StartTraining(JobMessage):
    """Train a job attempt on a runner."""

    subject: ClassVar[str] = subjects.CMD_TRAIN

    project_id: str
    experiment_name: str
    config: TrainingConfig
    dataset: DatasetRef
    resume_from: CheckpointRef | None = None
    timeout_seconds: float | None = None


class IngestDataset(Message):
    """Check and store an uploaded dataset archive that the API put into the staging object store."""

    subject: ClassVar[str] = subjects.CMD_DATASET_INGEST

    dataset_id: str
    object_name: str
    sha256: str
    size_bytes: int
    filename: str
