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
    project_id: int | None = Field(default=None, ge=1, description="default: the caller's own Uncategorized project")


class DatasetResponse(BaseModel):
    """A dataset and the statistics of its current version."""

    id: str
    project_id: int
    name: str
    description: str | None
    source: str = "upload"
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
    message: str = ""


class UploadAccepted(BaseModel):
    """Answer to an upload: storage checks it next, then the dataset becomes `ready` or `rejected`."""

    status: str
    dataset_id: str
    message: str
    object_name: str
    sha256: str
    size_bytes: int


class SplitRequest(BaseModel):
    """Body of `POST /datasets/{id}/split`."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["auto", "manual", "partial"] = "auto"
    default_ratio: list[float] = Field(default_factory=lambda: [0.8, 0.2])
    seed: int = 42
    splits: dict[str, list[str]] | None = None


class SplitResponse(BaseModel):
    """A version's split: how it was asked for, how many images each split got, and which."""

    dataset_id: str
    content_hash: str
    method: str
    default_ratio: list[float]
    seed: int
    counts: dict[str, int]
    splits: dict[str, list[str]]
    updated_at: datetime


class SnapshotRequest(BaseModel):
    """Body of `POST /datasets/{id}/snapshot`."""

    model_config = ConfigDict(extra="forbid")

    version_tag: str | None = Field(default=None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    description: str | None = Field(default=None, max_length=10_000)


class SnapshotResponse(BaseModel):
    """A named dataset version."""

    id: int
    dataset_id: str
    version_tag: str
    description: str | None
    content_hash: str
    created_at: datetime


class VersionResponse(BaseModel):
    """One stored version of a dataset and who pins it."""

    content_hash: str
    created_at: datetime
    format: str | None
    num_images: int
    tags: list[str]
    pinned_by_jobs: int
    current: bool


class SnapshotListResponse(BaseModel):
    """Answer to `GET /datasets/{id}/snapshots`: the named snapshots and every stored version."""

    dataset_id: str
    snapshots: list[SnapshotResponse]
    versions: list[VersionResponse]


class ImageResponse(BaseModel):
    """One image of a dataset version and where a browser can fetch it."""

    filename: str
    presigned_url: str
    size: int


class ImageListResponse(BaseModel):
    """Answer to `GET /datasets/{id}/images`."""

    dataset_id: str
    content_hash: str | None = Field(description="the version listed; null while no version is stored yet")
    total_images: int
    limit: int
    offset: int
    images: list[ImageResponse]


class DeleteResponse(BaseModel):
    """Answer to `DELETE /datasets/{id}`: what went, and what stays in storage and why."""

    status: str
    dataset_id: str
    kept_versions: list[str]
    # Versions whose files storage is deleting (asynchronously: `evt.dataset.<id>.deleted` says when).
    deleted_versions: list[str] = []
    message: str


class AnalyzeRequest(BaseModel):
    """`POST /datasets/analyze` (the training wizard's legacy dataset-path field)."""

    model_config = ConfigDict(extra="ignore")

    path: str = Field(min_length=1, max_length=2048, description="a dataset of the caller's projects: its id, its "
                      "name, or its stored s3:// URI (never a path on the API host)")
    format_hint: str | None = Field(default=None, max_length=32)


class AnalyzeResponse(BaseModel):
    """What the wizard reads: `status`, and `dataset_info.format` to fill in the format."""

    status: str
    message: str
    dataset_info: dict[str, Any]
