"""Wire schemas of the dataset routes (API.md field names)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class CreateDatasetRequest(BaseModel):
    """Body of `POST /datasets`."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=256)
    description: str | None = Field(default=None, max_length=10_000)
    visibility: Literal["private", "public"] = "private"
    project_id: str = Field(default="default", min_length=1, max_length=128)


class DatasetResponse(BaseModel):
    """A dataset and the statistics of its current version."""

    id: str
    project_id: str
    name: str
    description: str | None
    format: str | None
    labeled: bool
    num_items: int
    num_images: int
    num_classes: int
    class_names: list[str]
    class_counts: dict[str, Any]
    splits: dict[str, Any]
    task_types: list[str]
    size_mb: float
    visibility: str
    status: str
    content_hash: str | None
    rejection_reason: str | None
    created_at: datetime


class CreateDatasetResponse(BaseModel):
    """Answer to `POST /datasets`."""

    status: str
    dataset_id: str
    dataset: DatasetResponse


class UploadAccepted(BaseModel):
    """Answer to an upload: storage checks it next, then the dataset becomes `ready` or `rejected`."""

    status: str
    dataset_id: str
    message: str
    object_name: str
    sha256: str
    size_bytes: int
