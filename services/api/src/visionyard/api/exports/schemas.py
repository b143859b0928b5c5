"""Request and response bodies of `/api/v1/export` (API.md field names)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from visionyard.shared.commands import ExportConfig, ValidationConfig


class CreateExportRequest(BaseModel):
    """`POST /api/v1/export/jobs`."""

    model_config = ConfigDict(extra="forbid")

    training_job_id: int = Field(ge=1)
    export_format: str = Field(min_length=1)
    checkpoint_path: str | None = None
    export_config: ExportConfig = Field(default_factory=ExportConfig)
    validation_config: ValidationConfig = Field(default_factory=ValidationConfig)
    set_as_default: bool = False


class ExportJobResponse(BaseModel):
    """One export job."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    training_job_id: int
    export_format: str
    checkpoint_path: str | None
    export_path: str | None
    version: int
    is_default: bool
    status: str
    error_message: str | None
    export_results: dict[str, Any] | None
    file_size_mb: float | None = None
    validation_passed: bool | None
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None


class ExportListResponse(BaseModel):
    """Every export of one training job, newest version first (`export_jobs` is what the frontend reads)."""

    training_job_id: int
    total: int
    export_jobs: list[ExportJobResponse]
    exports: list[ExportJobResponse]


class DeletedExportResponse(BaseModel):
    """Answer to `DELETE /export/jobs/{id}`."""

    status: str = "success"
    message: str


class FormatCapability(BaseModel):
    """What one export format offers for a framework/task."""

    format: str
    supported: bool
    native_support: bool
    requires_conversion: bool
    optimization_options: list[str] = Field(default_factory=list)


class CapabilitiesResponse(BaseModel):
    """`GET /api/v1/export/capabilities`."""

    framework: str
    task_type: str
    supported_formats: list[FormatCapability]
    default_format: str | None


class DownloadResponse(BaseModel):
    """`GET /api/v1/export/{id}/download`."""

    download_url: str
    expires_in: int | None = None
    file_size_mb: float | None = None
    sha256: str | None = None
