"""Request and response bodies of deployments (the original frontend's DeploymentList, DeploymentCard,
CreateDeploymentModal and InferenceTestPanel read these names)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

DeploymentType = Literal["platform_endpoint", "edge_package", "container", "download"]


class EndpointOptions(BaseModel):
    """`deployment_config` of a `platform_endpoint`."""

    model_config = ConfigDict(extra="forbid")

    auto_activate: bool = True


class EdgePackageOptions(BaseModel):
    """`deployment_config` of an `edge_package`."""

    model_config = ConfigDict(extra="forbid")

    package_name: str | None = Field(default=None, max_length=128)
    optimization_level: Literal["speed", "balanced", "size"] = "balanced"


class DownloadOptions(BaseModel):
    """`deployment_config` of a `download` (nothing to choose)."""

    model_config = ConfigDict(extra="forbid")


class CreateDeploymentRequest(BaseModel):
    """`POST /export/deployments`."""

    model_config = ConfigDict(extra="forbid")

    export_job_id: int = Field(ge=1)
    deployment_type: DeploymentType = "platform_endpoint"
    deployment_config: dict[str, Any] = Field(default_factory=dict)


class UsageStats(BaseModel):
    """What the endpoint answered so far (the card formats every number unguarded)."""

    request_count: int
    total_inference_time_ms: float
    avg_latency_ms: float
    avg_inference_time_ms: float
    last_request_at: datetime | None


class DeploymentResponse(BaseModel):
    """One deployment."""

    id: int
    export_job_id: int
    training_job_id: int
    project_id: int | None
    deployment_type: str
    status: str
    deployment_config: dict[str, Any]
    export_format: str | None
    task_type: str | None
    checkpoint_kind: str
    created_at: datetime
    activated_at: datetime | None
    deactivated_at: datetime | None
    usage_stats: UsageStats
    error_message: str | None


class DeploymentListResponse(BaseModel):
    """`GET /export/deployments`."""

    total: int
    deployments: list[DeploymentResponse]


class DeletedDeployment(BaseModel):
    """`DELETE /export/deployments/{id}`."""

    status: str
    deployment_id: int
    message: str


class PredictRequest(BaseModel):
    """The body InferenceTestPanel posts to the endpoint: a base64 image (a data URL is accepted too)."""

    model_config = ConfigDict(extra="ignore")

    image: str = Field(min_length=1)
    confidence_threshold: float = Field(default=0.0, ge=0.0, le=1.0)
    iou_threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    max_detections: int | None = Field(default=None, ge=1)
    top_k: int = Field(default=5, ge=1, le=100)


class BoundingBox(BaseModel):
    """A detection's corners in pixels."""

    x1: float
    y1: float
    x2: float
    y2: float


class Detection(BaseModel):
    """One detected object."""

    class_id: int
    class_name: str | None
    confidence: float
    bbox: BoundingBox


class ClassificationResult(BaseModel):
    """The top class."""

    class_id: int
    class_name: str
    confidence: float


class PredictResponse(BaseModel):
    """The endpoint's answer (InferenceTestPanel reads `inference_time_ms`, `detections`, `classification_result`)."""

    deployment_id: int
    inference_job_id: int
    task_type: str
    inference_time_ms: float
    latency_ms: float
    classification_result: ClassificationResult | None = None
    top5_predictions: list[Any] = Field(default_factory=list)
    detections: list[Detection] = Field(default_factory=list)
