"""Commands: imperative requests for work, stored in the COMMANDS work-queue stream."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

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
    # The version's configured split (`{"train": [relative paths], "val": [...]}`), if one was set.
    split: dict[str, list[str]] | None = None


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


class DeleteDataset(Message):
    """Delete a deleted dataset's stored versions from the bucket, except the `keep_hashes` jobs pinned."""

    subject: ClassVar[str] = subjects.CMD_DATASET_DELETE

    dataset_id: str
    keep_hashes: list[str] = Field(default_factory=list)


class DeleteUploads(Message):
    """Delete uploaded inference images of one session from the bucket (keys as storage issued them)."""

    subject: ClassVar[str] = subjects.CMD_UPLOAD_DELETE

    session_id: str
    keys: list[str] = Field(default_factory=list)


# -- export and inference of what was trained -----------------------------------------------------


class ExportConfig(BaseModel):
    """How to export: ONNX opset, whether the batch axis is dynamic, and optional optimizations."""

    model_config = ConfigDict(extra="forbid")

    opset_version: int = Field(default=17, ge=9, le=21)
    # True, or the original frontend's {"images": [0]}: only the batch axis (0) can be dynamic.
    dynamic_axes: bool = True
    embed_preprocessing: bool = False
    simplify: bool = False
    fp16: bool = False
    int8: bool = False
    # Options of formats Visionyard does not export to (TensorRT, Core ML): accepted so that the original
    # export dialog can send them, and ignored by the ONNX and TorchScript exporters.
    max_batch_size: int | None = Field(default=None, ge=1, le=4096)
    minimum_deployment_target: str | None = Field(default=None, max_length=32)

    @field_validator("dynamic_axes", mode="before")
    @classmethod
    def _batch_axis_only(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        for name, axes in value.items():
            if not isinstance(axes, list) or any(not isinstance(axis, int) or isinstance(axis, bool) for axis in axes):
                raise ValueError(f"dynamic_axes.{name} must be a list of axis numbers")
            if any(axis != 0 for axis in axes):
                raise ValueError(f"dynamic_axes.{name}: only the batch axis (0) can be dynamic")
        return any(value.values())


class ValidationConfig(BaseModel):
    """How to check an export: compare it with the PyTorch model on `num_samples` seeded inputs."""

    model_config = ConfigDict(extra="forbid")

    validate_outputs: bool = True
    tolerance: float = Field(default=1e-4, gt=0, le=1.0)
    num_samples: int = Field(default=8, ge=1, le=256)


class StartExport(JobMessage):
    """Export a stored checkpoint of a training job; `job_id` is the export job's id."""

    subject: ClassVar[str] = subjects.CMD_EXPORT

    training_job_id: str
    export_format: Literal["onnx", "torchscript"]
    checkpoint: CheckpointRef
    framework: str
    model_name: str
    task_type: str
    export_config: ExportConfig = Field(default_factory=ExportConfig)
    validation_config: ValidationConfig = Field(default_factory=ValidationConfig)
    timeout_seconds: float | None = None


class StartInference(JobMessage):
    """Classify stored images (or a dataset split) with a stored checkpoint; `job_id` is the inference id."""

    subject: ClassVar[str] = subjects.CMD_INFER

    training_job_id: str
    checkpoint: CheckpointRef
    framework: str
    model_name: str
    task_type: str
    inference_type: Literal["single", "batch", "dataset"]
    image_uris: list[str] = Field(default_factory=list)
    dataset: DatasetRef | None = None
    split: str | None = None
    top_k: int = Field(default=5, ge=1, le=100)
    confidence_threshold: float = Field(default=0.0, ge=0.0, le=1.0)
    timeout_seconds: float | None = None
