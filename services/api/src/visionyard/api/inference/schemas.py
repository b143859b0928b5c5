"""Request and response bodies of `/api/v1/test_inference` (API.md field names)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class UploadedFile(BaseModel):
    """One kept upload."""

    original_filename: str
    unique_filename: str
    s3_uri: str
    s3_key: str


class UploadResponse(BaseModel):
    """`POST /inference/upload-images`."""

    status: str
    inference_session_id: str
    s3_prefix: str
    uploaded_files: list[UploadedFile]
    total_files: int


class SingleUploadResponse(BaseModel):
    """`POST /inference/upload-image?session_id=`: the kept image; `server_path` is what `quick` takes."""

    status: str
    session_id: str
    server_path: str
    filename: str
    original_filename: str
    unique_filename: str
    s3_uri: str
    s3_key: str


class SessionDeleted(BaseModel):
    """`DELETE /inference/session/{session_id}`."""

    status: str
    session_id: str
    deleted_files: int
    message: str


class InputData(BaseModel):
    """What to classify and how."""

    model_config = ConfigDict(extra="ignore")

    # A list of uploaded URIs, or (as the original frontend sends it) the `s3_prefix` of an upload.
    image_paths_s3: list[str] | str = Field(default_factory=list)
    dataset_split: str | None = None
    confidence_threshold: float = Field(default=0.0, ge=0.0, le=1.0)
    iou_threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    max_detections: int | None = Field(default=None, ge=1)
    image_size: int | None = Field(default=None, ge=8, le=4096)
    top_k: int = Field(default=5, ge=1, le=100)


class CreateInferenceRequest(BaseModel):
    """`POST /inference/jobs`."""

    model_config = ConfigDict(extra="forbid")

    training_job_id: int = Field(ge=1)
    checkpoint_path: str | None = None
    inference_type: Literal["single", "batch", "dataset"] = "batch"
    input_data: InputData = Field(default_factory=InputData)


class InferenceJobResponse(BaseModel):
    """One inference job."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    training_job_id: int
    checkpoint_path: str | None
    inference_type: str
    status: str
    error_message: str | None
    task_type: str
    total_images: int | None
    total_inference_time_ms: float | None
    avg_inference_time_ms: float | None
    summary: dict[str, Any] | None = None
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None


class InferenceListResponse(BaseModel):
    """Every inference job of one training job, with a summary."""

    training_job_id: int
    total: int
    completed: int
    total_images: int
    avg_inference_time_ms: float | None
    jobs: list[InferenceJobResponse]


class ResultRow(BaseModel):
    """One image's prediction."""

    model_config = ConfigDict(from_attributes=True)

    image_name: str
    predicted_label: str | None
    predicted_label_id: int | None
    confidence: float | None
    top5_predictions: list[Any]
    predicted_boxes: list[Any] | None
    inference_time_ms: float | None
    true_label: str | None = None
    error: str | None = None
    # What the original test-inference panel also reads: the job's task, and the predictions in one list
    # (the top-k labels for classification, the boxes for detection) with their count.
    task_type: str | None = None
    predictions: list[Any] = Field(default_factory=list)
    num_detections: int | None = None


class ResultsResponse(BaseModel):
    """`GET /inference/jobs/{id}/results`."""

    inference_job_id: int
    training_job_id: int
    total_count: int
    skip: int
    limit: int
    avg_inference_time_ms: float | None
    results: list[ResultRow]


class QuickInferenceRequest(BaseModel):
    """`POST /inference/quick` (query parameters, as the original panel sends them)."""

    training_job_id: int = Field(ge=1)
    image_path: str = Field(min_length=1)
    checkpoint_path: str | None = None
    confidence_threshold: float = Field(default=0.25, ge=0.0, le=1.0)
    iou_threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    max_detections: int | None = Field(default=None, ge=1)
    top_k: int = Field(default=5, ge=1, le=100)


class QuickInferenceResponse(ResultRow):
    """One image's prediction, answered when the runner is done (the panel reads `task_type`,
    `inference_time_ms`, `top5_predictions`, `predicted_boxes`, `num_detections`)."""

    inference_job_id: int
    training_job_id: int
    checkpoint_path: str | None
    image_path: str
